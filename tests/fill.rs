//! Issue 3: background fill to READY, replica phases across restarts and store
//! outages, traces, eviction, the cache budget, and the operator's view.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{nbdsh, sh, DaemonProc};
use support::{
    free_port, http_get, lazyblk, make_ext4, pattern, publish, run, wait_http, StoreProc,
};

const CHUNK: usize = 1 << 20;

/// An image with `data_mib` MiB of distinct file data in a 64 MiB ext4.
fn image_with_data(dir: &Path, data_mib: usize) -> PathBuf {
    let files: Vec<(String, Vec<u8>)> = (0..data_mib)
        .map(|i| (format!("d/f{i}"), pattern(CHUNK, 1000 + i as u64)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    make_ext4(dir, 64, &files)
}

fn status(daemon: &DaemonProc, id: &str) -> Value {
    let (code, body) = http_get(&format!("{}/v1/templates/{id}", daemon.url())).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn wait_phase(daemon: &DaemonProc, id: &str, phase: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = status(daemon, id);
        if s["phase"] == phase {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} did not reach {phase}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cached_digests(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(shards) = std::fs::read_dir(cache.join("chunks")) {
        for shard in shards.flatten() {
            for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                out.push(f.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

fn verify_cache(cache: &Path) {
    use sha2::Digest;
    for name in cached_digests(cache) {
        let bytes = std::fs::read(cache.join("chunks").join(&name[..2]).join(&name)).unwrap();
        let actual: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(actual, name, "a cached chunk does not match its name");
    }
}

fn manifest_digests(store_url: &str, id: &str) -> Vec<Option<String>> {
    let (_, body) = http_get(&format!("{store_url}/v1/templates/{id}/manifest")).unwrap();
    let m: Value = serde_json::from_str(&body).unwrap();
    m["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().map(str::to_string))
        .collect()
}

#[test]
fn warm_reaches_ready_and_status_reads_well() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 12);
    publish(&store.url(), &image, "py311");
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);

    let (ok, out, err) = run(&["warm", "py311", "--wait", "--node", &daemon.url()]);
    assert!(ok, "warm --wait: {out}{err}");
    let s = status(&daemon, "py311");
    assert_eq!(s["phase"], "READY");
    assert_eq!(s["local_chunks"], s["stored_chunks"]);
    let stored = s["stored_chunks"].as_u64().unwrap();
    assert_eq!(
        store.metric("lazyblk_store_chunks_served_total") as u64,
        stored,
        "each chunk fetched once"
    );

    // A READY replica is served from the cache: reading everything fetches nothing.
    let copy = tmp.path().join("copy.img");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&daemon.nbd_uri("py311"), copy.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap());
    assert_eq!(
        store.metric("lazyblk_store_chunks_served_total") as u64,
        stored
    );
    // Its large reads left the chunk files by splice over the unix socket, not copied.
    let spliced = daemon.metric("lazyblk_nbd_spliced_bytes_total");
    assert!(spliced >= (8 << 20) as f64, "spliced {spliced} bytes");

    // Warming again is a no-op.
    let (ok, out, _) = run(&["warm", "py311", "--node", &daemon.url()]);
    assert!(ok && out.contains("READY"), "{out}");

    // The operator's views.
    let (ok, table, _) = run(&["status", "--node", &daemon.url()]);
    assert!(ok);
    println!("{table}");
    assert!(
        table.starts_with("TEMPLATE") && table.contains("py311") && table.contains("READY"),
        "{table}"
    );
    assert!(
        table.contains(&format!("{stored}/{stored} (100%)")),
        "{table}"
    );
    let (ok, one, _) = run(&["status", "py311", "--node", &daemon.url()]);
    assert!(ok);
    println!("{one}");
    assert!(
        one.contains("phase:      READY") && one.contains("from http://127.0.0.1"),
        "{one}"
    );
    let (ok, json, _) = run(&["status", "py311", "--json", "--node", &daemon.url()]);
    assert!(ok);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["phase"], "READY");

    // Metrics: the families an operator graphs.
    let (_, page) = http_get(&format!("{}/metrics", daemon.url())).unwrap();
    for family in [
        "lazyblk_cache_hits_total",
        "lazyblk_cache_misses_total",
        "lazyblk_fetched_bytes_total{",
        "lazyblk_fetch_seconds_bucket{",
        "lazyblk_nbd_requests_total{",
        "lazyblk_nbd_request_seconds_bucket{",
        "lazyblk_replica_chunks_local{template=\"py311\"}",
        "lazyblk_cache_evictions",
    ] {
        assert!(page.contains(family), "/metrics lacks {family}");
    }
    let (_, page) = http_get(&format!("{}/metrics", store.url())).unwrap();
    assert!(page.contains("lazyblk_store_chunks_served_total"));

    // The ready replica survives a restart as READY without fetching anything.
    let mut daemon = daemon;
    daemon.restart();
    wait_phase(&daemon, "py311", "READY", Duration::from_secs(20));
    assert_eq!(
        store.metric("lazyblk_store_chunks_served_total") as u64,
        stored
    );
}

#[test]
fn evict_refuses_in_use_templates_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 4);
    publish(&store.url(), &image, "base");
    let cache = tmp.path().join("cache");
    let daemon = DaemonProc::start_unix(&store.url(), &cache, &[]);
    let (ok, _, err) = run(&["warm", "base", "--wait", "--node", &daemon.url()]);
    assert!(ok, "{err}");
    assert!(!cached_digests(&cache).is_empty());

    // A client holds the export open.
    let mut holder = std::process::Command::new("/usr/bin/python3")
        .args([
            "-m",
            "nbd",
            "-u",
            &daemon.nbd_uri("base"),
            "-c",
            "import time; h.pread(4096, 0); time.sleep(30)",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&daemon, "base")["users"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the holder never showed up as a user"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, err) = run(&["evict", "base", "--node", &daemon.url()]);
    assert!(!ok, "evict of an in-use template must be refused: {out}");
    assert!(
        err.contains("in use by") && err.contains("nbd client"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(status(&daemon, "base")["phase"], "READY");

    let (ok, out, err) = run(&["evict", "base", "--force", "--node", &daemon.url()]);
    assert!(ok, "{out}{err}");
    let s = status(&daemon, "base");
    assert_eq!(s["phase"], "PENDING");
    let _ = holder.kill();
    let _ = holder.wait();
    let (ok, _, _) = run(&["evict", "base", "--node", &daemon.url()]);
    assert!(ok);
    assert_eq!(status(&daemon, "base")["local_chunks"], 0);
    assert!(
        cached_digests(&cache).is_empty(),
        "evict removed the chunks"
    );
    // Still served lazily after eviction.
    let (ok, _, err) = nbdsh(&daemon.nbd_uri("base"), "h.pread(4096, 0)");
    assert!(ok, "{err}");
}

#[test]
fn sigkill_mid_fill_resumes_without_refetching() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 16);
    publish(&store.url(), &image, "big");
    let cache = tmp.path().join("cache");
    // 4 MiB/s: the fill takes a few seconds, long enough to kill it in the middle.
    let mut daemon = DaemonProc::start_unix(
        &store.url(),
        &cache,
        &["--fill-rate", "4M", "--fill-concurrency", "2"],
    );
    let (ok, _, err) = run(&["warm", "big", "--node", &daemon.url()]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cached_digests(&cache).len() < 4 {
        assert!(Instant::now() < deadline, "fill made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill9();
    let kept = cached_digests(&cache).len();
    verify_cache(&cache);
    let served_at_kill = store.metric("lazyblk_store_chunks_served_total") as usize;
    assert!(kept < 16, "the kill came mid-fill ({kept} chunks)");

    daemon.restart();
    let s = wait_phase(&daemon, "big", "READY", Duration::from_secs(60));
    let stored = s["stored_chunks"].as_u64().unwrap() as usize;
    verify_cache(&cache);
    let served = store.metric("lazyblk_store_chunks_served_total") as usize;
    println!("killed with {kept} chunks local ({served_at_kill} served); READY after restart with {served} served for {stored} chunks");
    // Chunks in flight at the kill may be fetched twice; verified ones never are.
    assert!(
        served <= stored + (served_at_kill - kept),
        "verified chunks were fetched again"
    );
    assert_eq!(served - served_at_kill, stored - kept);
    let copy = tmp.path().join("copy.img");
    let (ok, _, err) = sh("nbdcopy", &[&daemon.nbd_uri("big"), copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap());
}

/// A store on a fixed port and root that the test can stop and start again.
struct RestartableStore {
    child: Option<Child>,
    root: PathBuf,
    port: u16,
}

impl RestartableStore {
    fn start(root: &Path) -> RestartableStore {
        let mut s = RestartableStore {
            child: None,
            root: root.to_path_buf(),
            port: free_port(),
        };
        s.spawn();
        s
    }
    fn spawn(&mut self) {
        let child = lazyblk()
            .args([
                "store",
                "--root",
                self.root.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{}", self.port),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_http(&format!("{}/healthz", self.url()));
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for RestartableStore {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_store_outage_fails_the_fill_and_its_return_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = RestartableStore::start(&tmp.path().join("store"));
    let image = image_with_data(tmp.path(), 16);
    publish(&store.url(), &image, "flaky");
    let cache = tmp.path().join("cache");
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &cache,
        &[
            "--fill-rate",
            "4M",
            "--fill-concurrency",
            "1",
            "--source-deadline",
            "1",
        ],
    );
    // Read the first chunk so a cached read can be checked during the outage.
    let (ok, first, err) = nbdsh(
        &daemon.nbd_uri("flaky"),
        "import sys; sys.stdout.write(h.pread(4096, 0).hex())",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["warm", "flaky", "--node", &daemon.url()]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cached_digests(&cache).len() < 4 {
        assert!(Instant::now() < deadline, "fill made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    store.stop();
    let s = wait_phase(&daemon, "flaky", "FAILED", Duration::from_secs(90));
    let error = s["last_error"].as_str().unwrap_or_default();
    println!("FAILED with: {error}");
    assert!(
        error.contains("unreachable") || error.contains("no source"),
        "{error}"
    );
    assert!(s["last_error_at"].is_string());
    let (ok, out, _) = run(&["warm", "flaky", "--wait", "--node", &daemon.url()]);
    assert!(
        !ok,
        "warm --wait on a FAILED replica reports the failure: {out}"
    );
    // Cached reads still work.
    let (ok, again, err) = nbdsh(
        &daemon.nbd_uri("flaky"),
        "import sys; sys.stdout.write(h.pread(4096, 0).hex())",
    );
    assert!(ok, "a cached read failed during the outage: {err}");
    assert_eq!(first, again);
    // The store comes back: the fill resumes on its own and finishes.
    store.spawn();
    wait_phase(&daemon, "flaky", "READY", Duration::from_secs(90));
    verify_cache(&cache);
}

#[test]
fn a_cache_smaller_than_the_template_still_reads_correctly() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 20);
    publish(&store.url(), &image, "large");
    let cache = tmp.path().join("cache");
    let daemon = DaemonProc::start_unix(&store.url(), &cache, &["--cache-size", "6M"]);
    let copy = tmp.path().join("copy.img");
    for _ in 0..2 {
        let (ok, _, err) = sh(
            "nbdcopy",
            &[&daemon.nbd_uri("large"), copy.to_str().unwrap()],
        );
        assert!(ok, "{err}");
        assert!(
            std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap(),
            "bytes differ under eviction"
        );
    }
    let used: u64 = cached_digests(&cache).len() as u64;
    assert!(
        used <= 6 + 2,
        "the cache holds {used} chunks with a budget of 6 (plus those being read)"
    );
    assert!(daemon.metric("lazyblk_cache_evictions") > 0.0);
    // Warming a template larger than the budget is refused with the reason.
    let (ok, _, err) = run(&["warm", "large", "--node", &daemon.url()]);
    assert!(!ok);
    assert!(err.contains("budget"), "{err}");
}

#[test]
fn a_fill_follows_the_published_trace_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 16);
    publish(&store.url(), &image, "booted");
    let digests = manifest_digests(&store.url(), "booted");
    let data: Vec<usize> = digests
        .iter()
        .enumerate()
        .filter(|(_, d)| d.is_some())
        .map(|(i, _)| i)
        .collect();
    // Node A "boots": reads three data chunks from the end of the image, in this order.
    let boot: Vec<usize> = vec![
        data[data.len() - 1],
        data[data.len() - 3],
        data[data.len() - 5],
    ];
    let a = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache-a"),
        &["--trace-quiet", "1"],
    );
    for &c in &boot {
        let (ok, _, err) = nbdsh(
            &a.nbd_uri("booted"),
            &format!("h.pread(4096, {})", c * CHUNK),
        );
        assert!(ok, "{err}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace: Value = loop {
        let (code, body) = http_get(&format!("{}/v1/templates/booted/trace", store.url())).unwrap();
        if code == 200 {
            break serde_json::from_str(&body).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "node A never published its trace"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let recorded: Vec<usize> = trace["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(recorded, boot, "the trace is the order of first reads");

    // Node B fills slowly, one chunk at a time: the trace's chunks come first.
    let cache_b = tmp.path().join("cache-b");
    let b = DaemonProc::start_unix(
        &store.url(),
        &cache_b,
        &["--fill-rate", "2M", "--fill-concurrency", "1"],
    );
    let (ok, _, err) = run(&["warm", "booted", "--node", &b.url()]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cached_digests(&cache_b).len() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let local = cached_digests(&cache_b);
    for &c in &boot {
        let d = digests[c].clone().unwrap();
        assert!(
            local.contains(&d),
            "trace chunk {c} was not among the first fetched ({} local)",
            local.len()
        );
    }
    wait_phase(&b, "booted", "READY", Duration::from_secs(60));
}

#[test]
fn a_chunk_file_a_crash_left_short_is_fetched_again_before_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 12);
    publish(&store.url(), &image, "t");
    let cache = tmp.path().join("cache");
    // A budget under twice the replica: a resumed fill whose own claims counted against
    // it would be refused forever.
    let mut daemon = DaemonProc::start_unix(&store.url(), &cache, &["--cache-size", "20M"]);
    let (ok, out, err) = run(&["warm", "t", "--wait", "--node", &daemon.url()]);
    assert!(ok, "warm --wait: {out}{err}");
    let stored = status(&daemon, "t")["stored_chunks"].as_u64().unwrap();
    daemon.stop();
    // What a power loss can leave of a fetched chunk: its name on a file short of its
    // bytes (fetched chunks are not fsynced one at a time).
    let victim = cached_digests(&cache)[0].clone();
    let path = cache.join("chunks").join(&victim[..2]).join(&victim);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    daemon.restart();
    // The resumed fill hashes the files it did not write, drops the short one, fails
    // once and is resumed by the supervisor, which fetches it again.
    let s = wait_phase(&daemon, "t", "READY", Duration::from_secs(60));
    assert_eq!(s["local_chunks"], s["stored_chunks"]);
    assert_eq!(
        store.metric("lazyblk_store_chunks_served_total") as u64,
        stored + 1,
        "only the short chunk is fetched again"
    );
    verify_cache(&cache);
    assert_eq!(daemon.metric("lazyblk_cache_corrupt_files") as u64, 1);
}
