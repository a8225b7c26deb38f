//! Issue 14: the Grafana dashboard in `dashboards/lazyblk.json` names only metrics that
//! exist: a store and a daemon member of its fleet are started, made to fetch, fill and
//! serve, and every `lazyblk_*` series the dashboard's queries name must appear on one
//! of their `/metrics` pages. Also: `--log-format json` writes one JSON object a line.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::node::{sh, DaemonProc};
use support::{http_get, make_ext4, pattern, publish, run, StoreProc};

/// The metric families a PromQL expression names (histogram and counter suffixes
/// folded into their family's exposed names as the page shows them).
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("lazyblk_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_string());
        i = end;
    }
    out
}

/// How long the fleet gets to reach a state the test waits for (a member seeing the
/// other, a scrape showing every series): generous, for a loaded machine; the test
/// goes on as soon as the state is reached.
const SETTLE: Duration = Duration::from_secs(90);

/// Waits until `done` holds, polling; panics with `what` after [`SETTLE`].
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {SETTLE:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The node ids a daemon sees as its peers (`GET /v1/node`).
fn peers_of(url: &str) -> Vec<String> {
    let Ok((200, body)) = http_get(&format!("{url}/v1/node")) else {
        return Vec::new();
    };
    let info: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    info["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The id of a daemon (`GET /v1/node`).
fn id_of(url: &str) -> String {
    let (status, body) = http_get(&format!("{url}/v1/node")).unwrap();
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    info["node_id"].as_str().unwrap().to_string()
}

/// The metric names the `/metrics` pages of `urls` expose: series and families.
fn exposed(urls: &[String]) -> BTreeSet<String> {
    let mut exposed = BTreeSet::new();
    for url in urls {
        let (status, page) = http_get(&format!("{url}/metrics")).unwrap();
        assert_eq!(status, 200);
        for line in page.lines() {
            // A family without series yet (no failure so far) still has its TYPE line.
            if let Some(family) = line.strip_prefix("# TYPE ") {
                exposed.insert(family.split(' ').next().unwrap_or("").to_string());
                continue;
            }
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            exposed.insert(name);
        }
    }
    exposed
}

/// The metric names the dashboard's queries use.
fn named_by_dashboard() -> BTreeSet<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dashboards/lazyblk.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut named = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            named.extend(names_in(target["expr"].as_str().unwrap()));
        }
    }
    named
}

/// The names of `named` that `exposed` lacks (histogram and counter suffixes folded).
fn missing(named: &BTreeSet<String>, exposed: &BTreeSet<String>) -> Vec<String> {
    let family = |n: &str| -> String {
        ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n)
            .to_string()
    };
    named
        .iter()
        .filter(|n| !exposed.contains(*n) && !exposed.contains(&family(n)))
        .cloned()
        .collect()
}

#[test]
fn every_metric_the_dashboard_names_exists() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    // 16 MiB of data: enough chunks that the first member owns some of them (with two
    // members each chunk has one chance in two).
    let image = make_ext4(dir.path(), 32, &[("f", pattern(16 << 20, 61))]);
    publish(&store.url(), &image, "t");
    let node = DaemonProc::start_member(&store.url(), &dir.path().join("n"), &[]);
    let (ok, out, err) = run(&["warm", "t", "--wait", "--node", &node.url()]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = sh("nbdinfo", &["--size", &node.nbd_uri("t")]);
    assert!(ok, "{err}");
    // A second member reads the template: the chunks the first owns come from it, once
    // the second sees it as a member (a heartbeat or two; longer on a loaded machine).
    let peer = DaemonProc::start_member(&store.url(), &dir.path().join("p"), &[]);
    let node_id = id_of(&node.url());
    wait_for("the second member sees the first", || {
        peers_of(&peer.url()).contains(&node_id)
    });
    let copy = dir.path().join("copy");
    let (ok, _, err) = sh("nbdcopy", &[&peer.nbd_uri("t"), copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["warm", "t", "--all-nodes", "--store", &store.url()]);
    assert!(ok, "{out}{err}");
    let (ok, _, _) = run(&[
        "policy",
        "set",
        "guest_agent",
        ">=1",
        "--store",
        &store.url(),
    ]);
    assert!(ok);

    let named = named_by_dashboard();
    assert!(named.len() >= 15, "{named:?}");
    // Series appear as their events happen (a peer fetch, a wish acted on at the next
    // heartbeat): wait for them rather than for a fixed time.
    let urls = [node.url(), peer.url(), store.url()];
    let deadline = Instant::now() + SETTLE;
    let mut last = missing(&named, &exposed(&urls));
    while !last.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        last = missing(&named, &exposed(&urls));
    }
    assert!(
        last.is_empty(),
        "the dashboard names metrics that do not exist (after {SETTLE:?}): {last:?}"
    );
}

#[test]
fn json_logs_are_one_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let mut store = support::lazyblk()
        .args([
            "--log-format",
            "json",
            "store",
            "--root",
            dir.path().to_str().unwrap(),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("LAZYBLK_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_http(&format!("http://127.0.0.1:{port}/healthz"));
    let _ = store.kill();
    let out = store.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{l}"
        );
    }
    assert!(err.contains("store listening"), "{err}");
}
