//! Issue 27: boot traces at block granularity, published by the first boot and replayed
//! by a fresh node before its boot reads them; a replay never delays a demand read,
//! stops when the template is evicted, and a trace of other content or past the
//! template's end is refused.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::node::{nbdsh, sh, DaemonProc};
use support::proxy::Proxy;
use support::{
    data_chunks, http_get, make_ext4, pattern, publish, put_trace, text_template, wait_for,
    StoreProc,
};

const CHUNK: u64 = 1 << 20;

/// An image with `data_mib` MiB of distinct file data in an ext4 with room for it.
fn image_with_data(dir: &Path, data_mib: usize) -> PathBuf {
    let files: Vec<(String, Vec<u8>)> = (0..data_mib)
        .map(|i| (format!("d/f{i}"), pattern(CHUNK as usize, 2700 + i as u64)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    make_ext4(dir, (data_mib as u64 + 16).max(64), &files)
}

fn stopped(daemon: &DaemonProc, reason: &str) -> f64 {
    daemon.metric(&format!(
        "lazyblk_replay_stopped_total{{reason=\"{reason}\"}}"
    ))
}

/// Store requests that carried template bytes (whole objects and ranges).
fn store_fetches(store: &StoreProc) -> f64 {
    store.metric("lazyblk_store_chunks_served_total")
        + store.metric("lazyblk_store_ranges_served_total")
}

/// Reads 4 KiB at each offset over one NBD connection; returns the bytes, concatenated.
fn read_all(uri: &str, offsets: &[u64]) -> Vec<u8> {
    let list: Vec<String> = offsets.iter().map(u64::to_string).collect();
    let script = format!(
        "import sys\nfor o in [{}]:\n    sys.stdout.write(h.pread(4096, o).hex())",
        list.join(",")
    );
    let (ok, out, err) = nbdsh(uri, &script);
    assert!(ok, "nbdsh: {err}");
    let hex = out.trim();
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn image_bytes(image: &Path, offsets: &[u64]) -> Vec<u8> {
    let bytes = std::fs::read(image).unwrap();
    offsets
        .iter()
        .flat_map(|&o| bytes[o as usize..o as usize + 4096].to_vec())
        .collect()
}

#[test]
fn the_first_boot_publishes_its_ranges_and_a_fresh_node_fetches_them_before_its_boot_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 12);
    publish(&store.url(), &image, "booted");
    let data = data_chunks(&store.url(), "booted");
    // The "boot": scattered 4 KiB reads in five data chunks, out of offset order.
    let offsets: Vec<u64> = [
        (data[data.len() - 1], 8192),
        (data[2], 0),
        (data[2], 4096),
        (data[data.len() - 4], 65536),
        (data[5], 12288),
        (data[0], 0),
    ]
    .iter()
    .map(|&(chunk, within)| chunk * CHUNK + within)
    .collect();
    let a = DaemonProc::start_unix(&store.url(), &tmp.path().join("a"), &["--trace-quiet", "1"]);
    assert_eq!(
        read_all(&a.nbd_uri("booted"), &offsets),
        image_bytes(&image, &offsets)
    );
    let mut trace = Value::Null;
    wait_for(
        "node A's trace in the store",
        Duration::from_secs(30),
        || {
            let (code, body) =
                http_get(&format!("{}/v1/templates/booted/trace", store.url())).unwrap();
            if code == 200 {
                trace = serde_json::from_str(&body).unwrap();
            }
            code == 200
        },
    );
    assert_eq!(trace["version"], 2, "{trace}");
    // The ranges, in the order they were first read; two reads that follow each other
    // are one range.
    let ranges: Vec<[u64; 2]> = serde_json::from_value(trace["ranges"].clone()).unwrap();
    let expected: Vec<[u64; 2]> = vec![
        [offsets[0], 4096],
        [offsets[1], 8192],
        [offsets[3], 4096],
        [offsets[4], 4096],
        [offsets[5], 4096],
    ];
    assert_eq!(ranges, expected, "{trace}");
    assert!(trace["content"].is_string(), "{trace}");

    // Node B has never seen the template: opening it replays the trace.
    let b = DaemonProc::start_unix(&store.url(), &tmp.path().join("b"), &[]);
    let (ok, _, err) = nbdsh(&b.nbd_uri("booted"), "h.get_size()");
    assert!(ok, "{err}");
    wait_for("node B's replay to finish", Duration::from_secs(30), || {
        stopped(&b, "done") == 1.0
    });
    let replayed = b.metric("lazyblk_replay_bytes_total");
    println!(
        "replay: {} runs, {replayed} bytes",
        b.metric("lazyblk_replay_ranges_total")
    );
    assert!(replayed >= 5.0 * 4096.0, "replayed {replayed} bytes");
    assert!(
        replayed < 5.0 * CHUNK as f64,
        "a sparse trace is fetched in blocks, not whole chunks: {replayed} bytes"
    );
    // The boot's reads now cost the store nothing: every byte was fetched before.
    let before = store_fetches(&store);
    assert_eq!(
        read_all(&b.nbd_uri("booted"), &offsets),
        image_bytes(&image, &offsets)
    );
    assert_eq!(
        store_fetches(&store),
        before,
        "node B's boot reads fetched from the store after the replay"
    );
    assert_eq!(stopped(&b, "left_trace"), 0.0);
}

fn stored_ranges(store: &StoreProc, id: &str) -> Option<Vec<[u64; 2]>> {
    let (code, body) = http_get(&format!("{}/v1/templates/{id}/trace", store.url())).unwrap();
    if code != 200 {
        return None;
    }
    let doc: Value = serde_json::from_str(&body).unwrap();
    serde_json::from_value(doc["ranges"].clone()).ok()
}

#[test]
fn later_boots_add_what_the_stored_trace_missed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 6);
    publish(&store.url(), &image, "grown");
    let data = data_chunks(&store.url(), "grown");
    let first = [data[3] * CHUNK, data[1] * CHUNK + 40960];
    let a = DaemonProc::start_unix(&store.url(), &tmp.path().join("a"), &["--trace-quiet", "1"]);
    read_all(&a.nbd_uri("grown"), &first);
    let mut ranges = None;
    wait_for("the first boot's trace", Duration::from_secs(30), || {
        ranges = stored_ranges(&store, "grown");
        ranges.is_some()
    });
    assert_eq!(ranges.unwrap(), vec![[first[0], 4096], [first[1], 4096]]);
    // The same node reads more after a pause longer than the quiet time (within the
    // window): the trace grows.
    let pause = [data[4] * CHUNK];
    read_all(&a.nbd_uri("grown"), &pause);
    // Another node boots, reading one range the trace has and one it misses.
    let b = DaemonProc::start_unix(&store.url(), &tmp.path().join("b"), &["--trace-quiet", "1"]);
    let second = [first[0], data[5] * CHUNK + 8192];
    read_all(&b.nbd_uri("grown"), &second);
    let want = vec![
        [first[0], 4096],
        [first[1], 4096],
        [pause[0], 4096],
        [second[1], 4096],
    ];
    let mut got = Vec::new();
    wait_for("the union of both boots", Duration::from_secs(30), || {
        got = stored_ranges(&store, "grown").unwrap_or_default();
        got.len() >= want.len()
    });
    let mut sorted = got.clone();
    sorted[2..].sort();
    let mut want_sorted = want.clone();
    want_sorted[2..].sort();
    assert_eq!(sorted, want_sorted, "{got:?}");
}

#[test]
fn a_sandbox_boot_records_its_reads_of_the_base_template() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 4);
    publish(&store.url(), &image, "base");
    let data = data_chunks(&store.url(), "base");
    let a = DaemonProc::start_unix(&store.url(), &tmp.path().join("a"), &["--trace-quiet", "1"]);
    let (ok, out, err) = support::run(&[
        "overlay",
        "create",
        "base",
        "--sandbox",
        "sb1",
        "--node",
        &a.url(),
    ]);
    assert!(ok, "{out}{err}");
    let offsets = [data[1] * CHUNK + 4096, data[0] * CHUNK];
    assert_eq!(
        read_all(&a.nbd_uri("sb1"), &offsets),
        image_bytes(&image, &offsets)
    );
    let mut trace = Value::Null;
    wait_for(
        "the sandbox's trace in the store",
        Duration::from_secs(30),
        || {
            let (code, body) =
                http_get(&format!("{}/v1/templates/base/trace", store.url())).unwrap();
            if code == 200 {
                trace = serde_json::from_str(&body).unwrap();
            }
            code == 200
        },
    );
    let ranges: Vec<[u64; 2]> = serde_json::from_value(trace["ranges"].clone()).unwrap();
    assert_eq!(
        ranges,
        vec![[offsets[0], 4096], [offsets[1], 4096]],
        "{trace}"
    );
}

#[test]
fn traces_past_the_end_or_of_other_content_are_refused_by_the_store_and_by_a_node() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 2);
    publish(&store.url(), &image, "past");
    publish(&store.url(), &image, "other");
    let size = support::manifest_json(&store.url(), "past")["size"]
        .as_u64()
        .unwrap();
    let past = serde_json::json!({"template": "past", "chunks": [], "version": 2,
        "ranges": [[0, 4096], [size - 4096, 8192]]});
    let (code, body) = put_trace(&store.url(), "past", &past);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("out of range"), "{body}");
    let other = serde_json::json!({"template": "other", "chunks": [], "version": 2,
        "content": "00".repeat(32), "ranges": [[0, 4096]]});
    let (code, body) = put_trace(&store.url(), "other", &other);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("other content"), "{body}");
    let named = serde_json::json!({"template": "past", "chunks": [], "version": 2,
        "ranges": [[0, 4096]]});
    let (code, body) = put_trace(&store.url(), "other", &named);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("names template"), "{body}");

    // Traces that reached the store some other way (written into its directory) are
    // refused by the node that would replay them, and nothing is fetched for them.
    let traces = store.root().join("traces");
    std::fs::write(traces.join("past.json"), past.to_string()).unwrap();
    std::fs::write(traces.join("other.json"), other.to_string()).unwrap();
    let node = DaemonProc::start_unix(&store.url(), &tmp.path().join("n"), &[]);
    for id in ["past", "other"] {
        let (ok, _, err) = nbdsh(&node.nbd_uri(id), "h.get_size()");
        assert!(ok, "{err}");
    }
    wait_for("both traces refused", Duration::from_secs(30), || {
        stopped(&node, "refused") == 2.0
    });
    assert_eq!(node.metric("lazyblk_replay_bytes_total"), 0.0);
    assert_eq!(node.metric("lazyblk_replay_started_total"), 0.0);
    // The template is still served.
    let offsets = [0u64, 4096];
    assert_eq!(
        read_all(&node.nbd_uri("past"), &offsets),
        image_bytes(&image, &offsets)
    );
}

/// A trace of one 4 KiB range in each data chunk, in `order`.
fn sparse_trace(id: &str, order: &[u64]) -> Value {
    let ranges: Vec<[u64; 2]> = order.iter().map(|&c| [c * CHUNK + 8192, 4096]).collect();
    serde_json::json!({"template": id, "chunks": order, "version": 2, "ranges": ranges})
}

#[test]
fn a_replay_stops_when_the_template_is_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 24);
    publish(&store.url(), &image, "slow");
    let data = data_chunks(&store.url(), "slow");
    let (code, body) = put_trace(&store.url(), "slow", &sparse_trace("slow", &data));
    assert_eq!(code, 200, "{body}");
    // A slow store: each request waits 150 ms; the replay fetches one run at a time.
    let proxy = Proxy::start(&store.url(), 0);
    proxy.delay_every(Duration::from_millis(150));
    let node = DaemonProc::start_unix(
        &proxy.url,
        &tmp.path().join("n"),
        &["--replay-in-flight", "1"],
    );
    let (ok, _, err) = nbdsh(&node.nbd_uri("slow"), "h.get_size()");
    assert!(ok, "{err}");
    wait_for("the replay's first runs", Duration::from_secs(30), || {
        node.metric("lazyblk_replay_ranges_total") >= 2.0
    });
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sS",
            "-X",
            "POST",
            &format!("{}/v1/templates/slow/evict", node.url()),
        ],
    );
    assert!(ok && out.contains("removed_chunks"), "{out}{err}");
    wait_for("the replay to stop", Duration::from_secs(10), || {
        stopped(&node, "evicted") == 1.0
    });
    let runs = node.metric("lazyblk_replay_ranges_total");
    assert!(
        runs < data.len() as f64,
        "the replay ran to its end: {runs}"
    );
    // A request the proxy held when the replay stopped may still reach the store.
    std::thread::sleep(Duration::from_secs(1));
    let fetches = store_fetches(&store);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        store_fetches(&store),
        fetches,
        "the store still serves the replay after the evict"
    );
    assert_eq!(stopped(&node, "done"), 0.0);
}

#[test]
fn a_replay_stops_when_the_template_is_unwarmed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 24);
    publish(&store.url(), &image, "wished");
    let data = data_chunks(&store.url(), "wished");
    let (code, body) = put_trace(&store.url(), "wished", &sparse_trace("wished", &data));
    assert_eq!(code, 200, "{body}");
    let proxy = Proxy::start(&store.url(), 0);
    proxy.delay_every(Duration::from_millis(300));
    // A member of the fleet whose fill crawls (the replica stays DISTRIBUTING).
    let node = DaemonProc::start_member(
        &proxy.url,
        &tmp.path().join("n"),
        &["--replay-in-flight", "1", "--fill-rate", "64K"],
    );
    let (ok, out, err) = support::run(&["warm", "wished", "--all-nodes", "--store", &store.url()]);
    assert!(ok, "warm --all-nodes: {out}{err}");
    wait_for(
        "the wish to reach the node",
        Duration::from_secs(30),
        || {
            let (code, body) = http_get(&format!("{}/v1/templates/wished", node.url()))
                .unwrap_or((0, String::new()));
            code == 200 && body.contains("DISTRIBUTING")
        },
    );
    let (ok, _, err) = nbdsh(&node.nbd_uri("wished"), "h.get_size()");
    assert!(ok, "{err}");
    wait_for("the replay's first run", Duration::from_secs(30), || {
        node.metric("lazyblk_replay_ranges_total") >= 1.0
    });
    let (ok, out, err) = support::run(&["unwarm", "wished", "--store", &store.url()]);
    assert!(ok, "unwarm: {out}{err}");
    wait_for("the replay to stop", Duration::from_secs(30), || {
        stopped(&node, "unwarmed") == 1.0
    });
    assert_eq!(stopped(&node, "done"), 0.0);
    let runs = node.metric("lazyblk_replay_ranges_total");
    assert!(
        runs < data.len() as f64,
        "the replay ran to its end: {runs}"
    );
}

#[test]
fn a_demand_read_of_blocks_being_replayed_joins_the_replays_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    // Text compresses: its chunks are stored in blocks, and small reads fetch blocks.
    let (image, at) = text_template(tmp.path(), &store.url(), "text");
    let chunk = at / CHUNK;
    // The trace: 32 KiB at the start of that chunk (four 8 KiB blocks).
    let doc = serde_json::json!({"template": "text", "chunks": [chunk], "version": 2,
        "ranges": [[chunk * CHUNK, 32768]]});
    let (code, body) = put_trace(&store.url(), "text", &doc);
    assert_eq!(code, 200, "{body}");
    // Each request waits 2 s at the proxy: the replay's fetch of the blocks is under way
    // for 2 s after the store served the chunk's table.
    let proxy = Proxy::start(&store.url(), 0);
    proxy.delay_every(Duration::from_secs(2));
    let node = DaemonProc::start_unix(&proxy.url, &tmp.path().join("n"), &[]);
    let uri = node.nbd_uri("text");
    let opener = {
        let uri = uri.clone();
        std::thread::spawn(move || nbdsh(&uri, "h.get_size()"))
    };
    wait_for(
        "the replay to fetch the chunk's table",
        Duration::from_secs(30),
        || store.metric("lazyblk_store_ranges_served_total") >= 1.0,
    );
    // A read of the second block, while the replay fetches blocks 0-3.
    let offsets = [chunk * CHUNK + 8192];
    assert_eq!(read_all(&uri, &offsets), image_bytes(&image, &offsets));
    assert!(opener.join().unwrap().0);
    wait_for("the replay to finish", Duration::from_secs(30), || {
        stopped(&node, "done") == 1.0
    });
    assert_eq!(
        store.metric("lazyblk_store_ranges_served_total"),
        2.0,
        "the chunk's table and one range of blocks: the read joined the replay's fetch"
    );
    assert_eq!(node.metric("lazyblk_replay_bytes_total"), 32768.0);
}

/// Seconds a cold 4 KiB read at `offset` takes, measured inside nbdsh after `settle`
/// seconds on the open connection (the replay that opening started is under way).
fn timed_cold_read(uri: &str, offset: u64, settle: f64) -> f64 {
    let script = format!(
        "import time, sys\ntime.sleep({settle})\nt = time.monotonic()\nh.pread(4096, {offset})\nsys.stdout.write(str(time.monotonic() - t))"
    );
    let (ok, out, err) = nbdsh(uri, &script);
    assert!(ok, "nbdsh: {err}");
    out.trim().parse().unwrap()
}

#[test]
fn a_replay_of_the_whole_template_does_not_delay_a_cold_demand_read() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 64);
    // Chunks of 256 KiB: a replay of hundreds of runs.
    let image_path = image.to_str().unwrap();
    let (ok, out, err) = support::run(&[
        "publish",
        image_path,
        "--template",
        "whole",
        "--store",
        &store.url(),
        "--chunk-size",
        "256K",
    ]);
    assert!(ok, "publish: {out}{err}");
    let chunk = support::manifest_json(&store.url(), "whole")["chunk_size"]
        .as_u64()
        .unwrap();
    let data = data_chunks(&store.url(), "whole");
    // The whole template, chunk by chunk; the chunk read below comes last.
    let (target, rest) = data.split_first().unwrap();
    let mut ranges: Vec<[u64; 2]> = rest.iter().map(|&c| [c * chunk, chunk]).collect();
    ranges.push([*target * chunk, chunk]);
    let mut order = rest.to_vec();
    order.push(*target);
    let doc =
        serde_json::json!({"template": "whole", "chunks": order, "version": 2, "ranges": ranges});
    let (code, body) = put_trace(&store.url(), "whole", &doc);
    assert_eq!(code, 200, "{body}");
    // 300 ms a request, and the replay asks for four times more runs at once than the
    // node has fetch slots for demand reads: it takes many seconds, the read about one.
    let proxy = Proxy::start(&store.url(), 0);
    proxy.delay_every(Duration::from_millis(300));
    let with = DaemonProc::start_unix(
        &proxy.url,
        &tmp.path().join("with"),
        &["--replay-in-flight", "64"],
    );
    let without = DaemonProc::start_unix(&proxy.url, &tmp.path().join("without"), &["--no-replay"]);
    let offset = *target * chunk + 8192;
    let alone = timed_cold_read(&without.nbd_uri("whole"), offset, 1.0);
    let beside = timed_cold_read(&with.nbd_uri("whole"), offset, 1.0);
    let replayed = with.metric("lazyblk_replay_bytes_total");
    println!("cold 4 KiB read: {alone:.3} s alone, {beside:.3} s beside a replay ({replayed} bytes replayed so far)");
    assert_eq!(
        stopped(&with, "done"),
        0.0,
        "the replay was still under way"
    );
    assert!(
        with.metric("lazyblk_replay_ranges_total") >= 1.0,
        "the replay had started"
    );
    assert!(
        beside <= 2.0 * alone,
        "a cold read beside a replay took {beside:.3} s, alone {alone:.3} s"
    );
    assert_eq!(without.metric("lazyblk_replay_started_total"), 0.0);
}
