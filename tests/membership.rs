//! Issue 23 (findings 1, 2 and 9): a fleet no stranger can steer. Leases are signed by
//! the node's key and its id derives from that key, so no one can renew, rewrite or end
//! another node's lease, advertise an address with a path of their choosing, or hide a
//! node's users; deletes and gc do not trust a membership view the store has just
//! rebuilt, and tombstones wait for the nodes that used a template; the membership and
//! its reports are bounded.
//!
//! Signed requests are made by `support::lease`, independently of the daemon's code.

mod support;

use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use support::lease::{heartbeat, id_of, key, now_ms, request, signed};
use support::node::{sh, DaemonProc};
use support::{http_get, make_ext4, pattern, publish, run, StoreProc};

fn beat(url: &str) -> Value {
    json!({ "url": url, "version": "test", "replicas": [] })
}

fn bearer(token: &str) -> Vec<(String, String)> {
    vec![("authorization".into(), format!("Bearer {token}"))]
}

fn live_nodes(store: &str) -> Vec<Value> {
    let (ok, out, err) = run(&["nodes", "--store", store, "--json"]);
    assert!(ok, "lazyblk nodes: {err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn node_key(cache: &std::path::Path) -> Value {
    let (ok, out, err) = run(&["node-key", "--cache", cache.to_str().unwrap(), "--json"]);
    assert!(ok, "node-key: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Finding 1: the write token (or no token at all) no longer makes anyone any node.
#[test]
fn no_one_can_take_over_or_empty_another_nodes_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start_with(&["--write-token", "w"]);
    let url = store.url();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(2 << 20, 91))]);
    let (ok, out, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "t",
        "--store",
        &url,
        "--write-token",
        "w",
    ]);
    assert!(ok, "{out}{err}");
    let cache = dir.path().join("a");
    let member = DaemonProc::start_member(&url, &cache, &["--write-token", "w"]);
    let ident = node_key(&cache);
    let id = ident["node_id"].as_str().unwrap().to_string();
    wait_for("the member's lease", Duration::from_secs(20), || {
        live_nodes(&url).iter().any(|n| n["id"] == id.as_str())
    });
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "t",
        "--sandbox",
        "sb",
        "--node",
        &member.url(),
        "--token",
        "w",
    ]);
    assert!(ok, "{out}{err}");

    // The store's write token alone, no key: refused.
    let hijack = beat("http://127.0.0.1:1/internal/admin?x=");
    let body = serde_json::to_vec(&hijack).unwrap();
    let (status, answer) = request(&url, "PUT", &format!("/v1/nodes/{id}"), &bearer("w"), &body);
    assert_eq!(status, 401, "an unsigned lease for another node: {answer}");
    // A key of one's own, the other node's id: refused.
    let mallory = key(7);
    let (status, answer) = heartbeat(&url, &mallory, &id, &hijack, &bearer("w"));
    assert_eq!(status, 401, "a lease signed by another key: {answer}");
    assert!(answer.contains("is not the id of the key"), "{answer}");
    // Its own id, an address with a path and query: refused.
    let (status, answer) = heartbeat(&url, &mallory, &id_of(&mallory), &hijack, &bearer("w"));
    assert_eq!(status, 400, "an advertised URL with a path: {answer}");
    // Ending the member's lease without its key: refused.
    let (status, _) = request(
        &url,
        "DELETE",
        &format!("/v1/nodes/{id}"),
        &bearer("w"),
        b"",
    );
    assert_eq!(status, 401);

    // The member keeps its address, and its users keep the template from deletion.
    std::thread::sleep(Duration::from_millis(4500));
    let nodes = live_nodes(&url);
    let entry = nodes.iter().find(|n| n["id"] == id.as_str()).unwrap();
    assert_eq!(entry["url"], member.url().as_str(), "{entry}");
    assert_eq!(entry["key"], ident["public_key"], "{entry}");
    let (ok, _, err) = run(&["delete", "t", "--store", &url, "--write-token", "w"]);
    assert!(
        !ok && err.contains("in use"),
        "delete while the sandbox reads: {err}"
    );

    // A request seen once is not taken twice (a captured heartbeat replayed).
    let path = format!("/v1/nodes/{}", id_of(&mallory));
    let good = serde_json::to_vec(&beat("http://127.0.0.1:9")).unwrap();
    let mut headers = signed(&mallory, "PUT", &path, &good, now_ms());
    headers.extend(bearer("w"));
    assert_eq!(request(&url, "PUT", &path, &headers, &good).0, 200);
    assert_eq!(
        request(&url, "PUT", &path, &headers, &good).0,
        409,
        "a replay"
    );
}

/// Finding 1: leases need the member token, not the write token; `--member-keys` and
/// `--member-networks` bound who joins and where.
#[test]
fn membership_has_rights_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("member-keys");
    let cache = dir.path().join("a");
    let ident = node_key(&cache);
    std::fs::write(
        &keys,
        format!(
            "# the fleet\n{} node a\n",
            ident["public_key"].as_str().unwrap()
        ),
    )
    .unwrap();
    let store = StoreProc::start_with(&[
        "--write-token",
        "w",
        "--member-token",
        "m",
        "--admin-token",
        "adm",
        "--member-keys",
        keys.to_str().unwrap(),
        "--member-networks",
        "127.0.0.0/8",
    ]);
    let url = store.url();
    // A daemon that holds the member token and no write token joins.
    let member = DaemonProc::start_member(&url, &cache, &["--member-token", "m"]);
    wait_for("the member's lease", Duration::from_secs(20), || {
        live_nodes(&url).iter().any(|n| n["id"] == ident["node_id"])
    });
    // A key the file does not list: refused, whatever token it holds.
    let stranger = key(9);
    let (status, answer) = heartbeat(
        &url,
        &stranger,
        &id_of(&stranger),
        &beat("http://127.0.0.1:9"),
        &bearer("m"),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("--member-keys"), "{answer}");
    // Listed (the file is read again), but advertising outside the networks: refused.
    let mut listed = std::fs::read_to_string(&keys).unwrap();
    listed.push_str(&format!("{}\n", id_of(&stranger)));
    std::fs::write(&keys, listed).unwrap();
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&keys)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (status, answer) = heartbeat(
        &url,
        &stranger,
        &id_of(&stranger),
        &beat("http://192.0.2.1:7071"),
        &bearer("m"),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("--member-networks"), "{answer}");
    // The write token is not the member token, nor the admin token.
    let (status, _) = heartbeat(
        &url,
        &stranger,
        &id_of(&stranger),
        &beat("http://127.0.0.1:9"),
        &bearer("w"),
    );
    assert_eq!(status, 401);
    let (status, _) = heartbeat(
        &url,
        &stranger,
        &id_of(&stranger),
        &beat("http://127.0.0.1:9"),
        &bearer("m"),
    );
    assert_eq!(status, 200);
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 92))]);
    let (ok, out, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "t",
        "--store",
        &url,
        "--write-token",
        "w",
    ]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(&["delete", "t", "--store", &url, "--write-token", "w"]);
    assert!(!ok && err.contains("admin token"), "{err}");
    let (ok, _, err) = run(&["delete", "t", "--store", &url, "--write-token", "m"]);
    assert!(!ok && err.contains("admin token"), "{err}");
    let (ok, out, err) = run(&["delete", "t", "--store", &url, "--write-token", "adm"]);
    assert!(ok, "{out}{err}");
    drop(member);
}

/// Finding 2: after a restart the store's membership is empty; a delete or gc must not
/// take that for "no one uses it", and a tombstone waits for the nodes that used it.
#[test]
fn deletes_and_gc_wait_for_the_nodes_a_restarted_store_knew() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = StoreProc::start();
    let url = store.url();
    let image = make_ext4(dir.path(), 16, &[("f", pattern(8 << 20, 93))]);
    let expected = std::fs::read(&image).unwrap();
    publish(&url, &image, "base");
    publish(&url, &image, "other");
    let node = DaemonProc::start_member(&url, &dir.path().join("n"), &[]);
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "base",
        "--sandbox",
        "sb",
        "--node",
        &node.url(),
    ]);
    assert!(ok, "{out}{err}");
    wait_for("the sandbox reported", Duration::from_secs(20), || {
        live_nodes(&url).iter().any(|n| {
            n["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["template"] == "base" && !r["users"].as_array().unwrap().is_empty())
        })
    });

    // A plain delete right after a restart: refused until the node has renewed.
    store.restart();
    let (ok, _, err) = run(&["delete", "base", "--store", &url]);
    assert!(!ok, "a delete 0 s after a restart succeeded");
    assert!(err.contains("restarted") || err.contains("in use"), "{err}");
    wait_for("the node back", Duration::from_secs(20), || {
        !live_nodes(&url).is_empty()
    });
    std::thread::sleep(Duration::from_millis(2500));
    let (ok, _, err) = run(&["delete", "base", "--store", &url]);
    assert!(!ok && err.contains("in use"), "{err}");

    // Forced: the tombstone keeps the chunks, across a restart and a gc right after it.
    let (ok, out, err) = run(&["delete", "base", "--force", "--store", &url]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(&["delete", "other", "--store", &url]);
    assert!(ok, "{out}{err}");
    store.restart();
    let (ok, _, err) = run(&["gc", "--grace", "0s", "--store", &url]);
    assert!(
        !ok && err.contains("restarted"),
        "gc 0 s after a restart: {err}"
    );
    wait_for("gc to be allowed", Duration::from_secs(30), || {
        run(&["gc", "--grace", "0s", "--store", &url]).0
    });
    let copy = dir.path().join("sb.out");
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri("sb"), copy.to_str().unwrap()]);
    assert!(ok, "the sandbox after gc: {err}");
    assert!(
        std::fs::read(&copy).unwrap() == expected,
        "the sandbox reads its base"
    );
    let tombstones = std::fs::read_to_string(store.root().join("center/deleted.json")).unwrap();
    assert!(tombstones.contains("\"base\""), "{tombstones}");

    // The node goes away (a crash, a partition) past its lease: an empty view is no
    // reason to let the tombstone go.
    let cache = node.cache.clone();
    drop(node);
    wait_for(
        "the node's lease to run out",
        Duration::from_secs(30),
        || live_nodes(&url).is_empty(),
    );
    let (ok, out, err) = run(&["gc", "--grace", "0s", "--store", &url]);
    assert!(ok, "{out}{err}");
    let tombstones = std::fs::read_to_string(store.root().join("center/deleted.json")).unwrap();
    assert!(
        tombstones.contains("\"base\""),
        "dropped on an empty view: {tombstones}"
    );

    // It comes back, stops using it, says so, and the next gc lets the tombstone go.
    let node = DaemonProc::start_member(&url, &cache, &[]);
    wait_for("the node back", Duration::from_secs(20), || {
        !live_nodes(&url).is_empty()
    });
    let (ok, out, err) = run(&["overlay", "delete", "sb", "--node", &node.url()]);
    assert!(ok, "{out}{err}");
    std::thread::sleep(Duration::from_millis(4500));
    let (ok, out, err) = run(&["gc", "--grace", "0s", "--store", &url]);
    assert!(ok, "{out}{err}");
    let tombstones = std::fs::read_to_string(store.root().join("center/deleted.json")).unwrap();
    assert!(!tombstones.contains("\"base\""), "{tombstones}");
}

/// Finding 9: members, reports and heartbeat answers are bounded.
#[test]
fn membership_and_reports_are_bounded() {
    let store = StoreProc::start_with(&["--max-members", "3"]);
    let url = store.url();
    // A report far over the bounds.
    let big = key(1);
    let replicas: Vec<Value> = (0..2000)
        .map(|i| json!({"template": format!("t{i}"), "phase": "READY", "local_chunks": 1, "stored_chunks": 1, "users": ["x"]}))
        .collect();
    let report = json!({"url": "http://127.0.0.1:9", "version": "t", "replicas": replicas});
    let (status, answer) = heartbeat(&url, &big, &id_of(&big), &report, &[]);
    assert!(status == 413, "a 2000-replica report: {status} {answer}");
    let users: Vec<String> = (0..100).map(|i| format!("overlay sb{i}")).collect();
    let report = json!({"url": "http://127.0.0.1:9", "version": "t",
        "replicas": [{"template": "t", "phase": "READY", "local_chunks": 1, "stored_chunks": 1, "users": users}]});
    let (status, answer) = heartbeat(&url, &big, &id_of(&big), &report, &[]);
    assert_eq!(status, 413, "100 users of one replica: {answer}");
    // Three members fit; a fourth is refused with the flag named.
    let reported = json!({"url": "http://127.0.0.1:9", "version": "t",
        "replicas": [{"template": "t", "phase": "READY", "local_chunks": 1, "stored_chunks": 1, "users": ["overlay a"]}]});
    for seed in 2..5u8 {
        let k = key(seed);
        let (status, answer) = heartbeat(&url, &k, &id_of(&k), &reported, &[]);
        assert_eq!(status, 200, "{answer}");
        // The answer names the members; it does not carry their reports.
        let a: Value = serde_json::from_str(&answer).unwrap();
        for n in a["nodes"].as_array().unwrap() {
            assert!(n["replicas"].as_array().is_none_or(|r| r.is_empty()), "{n}");
            assert!(n["url"].is_string() && n["id"].is_string());
        }
    }
    let k = key(5);
    let (status, answer) = heartbeat(&url, &k, &id_of(&k), &beat("http://127.0.0.1:9"), &[]);
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("--max-members"), "{answer}");
    // `GET /v1/nodes` still has the reports for operators.
    let (_, body) = http_get(&format!("{url}/v1/nodes")).unwrap();
    assert!(body.contains("overlay a"), "{body}");
}

/// A daemon refuses to advertise an address other daemons would send their token to
/// with a path of the operator's mistake.
#[test]
fn a_daemon_refuses_an_advertised_url_with_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let out = support::lazyblk()
        .args([
            "daemon",
            "--cache",
            dir.path().join("c").to_str().unwrap(),
            "--store",
            &store.url(),
        ])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--nbd",
            &format!("unix:{}", dir.path().join("s").display()),
        ])
        .args(["--advertise", "http://127.0.0.1:7071/admin?x="])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--advertise") && err.contains("no path"),
        "{err}"
    );
}
