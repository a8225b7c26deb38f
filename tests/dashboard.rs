//! Issue 14: the Grafana dashboard in `dashboards/lazyblk.json` names only metrics that
//! exist: a store and a daemon member of its fleet are started, made to fetch, fill and
//! serve, and every `lazyblk_*` series the dashboard's queries name must appear on one
//! of their `/metrics` pages. Also: `--log-format json` writes one JSON object a line.

mod support;

use std::collections::BTreeSet;

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

#[test]
fn every_metric_the_dashboard_names_exists() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 16, &[("f", pattern(4 << 20, 61))]);
    publish(&store.url(), &image, "t");
    let node = DaemonProc::start_member(&store.url(), &dir.path().join("n"), &[]);
    let (ok, out, err) = run(&["warm", "t", "--wait", "--node", &node.url()]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = sh("nbdinfo", &["--size", &node.nbd_uri("t")]);
    assert!(ok, "{err}");
    // A second member reads the template: some chunks come from the first as owner.
    let peer = DaemonProc::start_member(&store.url(), &dir.path().join("p"), &[]);
    std::thread::sleep(std::time::Duration::from_millis(4500));
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
    std::thread::sleep(std::time::Duration::from_millis(2500));

    let mut exposed = BTreeSet::new();
    for url in [node.url(), peer.url(), store.url()] {
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
    assert!(named.len() >= 15, "{named:?}");
    let family = |n: &str| -> String {
        ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n)
            .to_string()
    };
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !exposed.contains(*n) && !exposed.contains(&family(n)))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard names metrics that do not exist: {missing:?}"
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
