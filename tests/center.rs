//! Issue 13: the template center. Wishes warm a template across the fleet (every node,
//! nodes that join later, a node that FAILED once its source is back); `delete` is
//! refused while a node uses the template; gc spares what another template needs; a
//! label policy marks old templates STALE.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::proxy::{Proxy, FAIL};
use support::{make_ext4, pattern, publish, run, StoreProc};

fn json(args: &[&str]) -> Value {
    let (ok, out, err) = run(args);
    assert!(ok, "lazyblk {}: {out}{err}", args.join(" "));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn replicas(store: &StoreProc, id: &str) -> String {
    let list = json(&["templates", "--json", "--store", &store.url()]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == id)
        .and_then(|t| t["replicas"]["status"].as_str())
        .unwrap_or("")
        .to_string()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// How long the fleet gets to report a change (a heartbeat is every 2 s): generous, for
/// a loaded machine; waits end as soon as the change is seen.
const SETTLE: Duration = Duration::from_secs(60);

/// The users the live nodes report of template `id` (`GET /v1/nodes`).
fn users_of(store: &StoreProc, id: &str) -> Vec<String> {
    let (_, body) = support::http_get(&format!("{}/v1/nodes", store.url())).unwrap();
    let nodes: Value = serde_json::from_str(&body).unwrap_or_default();
    let mut users = Vec::new();
    for node in nodes.as_array().cloned().unwrap_or_default() {
        for r in node["replicas"].as_array().cloned().unwrap_or_default() {
            if r["template"] == id {
                users.extend(
                    r["users"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|u| u.as_str().map(str::to_string)),
                );
            }
        }
    }
    users
}

fn live(store: &StoreProc) -> usize {
    json(&["nodes", "--store", &store.url(), "--json"])
        .as_array()
        .map_or(0, |a| a.len())
}

#[test]
fn wishes_warm_the_fleet_retry_failures_and_reach_late_joiners() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 16, &[("f", pattern(6 << 20, 41))]);
    publish(&store.url(), &image, "t");
    // Three healthy nodes share a peer token; the fourth has the wrong one (its peers
    // refuse it) and reaches the store through a proxy that fails every chunk GET.
    let proxy = Proxy::start(&store.url(), FAIL);
    let mut nodes: Vec<DaemonProc> = (0..3)
        .map(|i| {
            DaemonProc::start_member(
                &store.url(),
                &dir.path().join(format!("n{i}")),
                &["--peer-token", "secret"],
            )
        })
        .collect();
    let broken = DaemonProc::start_member(
        &proxy.url,
        &dir.path().join("broken"),
        &["--peer-token", "wrong"],
    );
    wait_for("four live nodes", Duration::from_secs(20), || {
        live(&store) == 4
    });

    let (ok, out, err) = run(&["warm", "t", "--all-nodes", "--store", &store.url()]);
    assert!(ok, "warm --all-nodes: {out}{err}");
    // Five tries with backoff against a source that fails every chunk, then FAILED: on a
    // loaded machine that took over a minute.
    wait_for(
        "FAILED on the broken node",
        Duration::from_secs(180),
        || replicas(&store, "t") == "FAILED 1",
    );
    let fleet = json(&["status", "t", "--fleet", "--store", &store.url(), "--json"]);
    let lines = fleet.as_array().unwrap();
    assert_eq!(lines.len(), 4);
    let failed: Vec<&Value> = lines.iter().filter(|l| l["phase"] == "FAILED").collect();
    assert_eq!(failed.len(), 1, "{fleet}");
    assert!(failed[0]["url"] == broken.url().as_str(), "{fleet}");
    assert!(
        failed[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("503"),
        "{fleet}"
    );
    assert_eq!(
        lines.iter().filter(|l| l["phase"] == "READY").count(),
        3,
        "{fleet}"
    );
    let (ok, out, _) = run(&["status", "t", "--fleet", "--store", &store.url()]);
    assert!(
        ok && out.contains("FAILED") && out.contains("READY"),
        "{out}"
    );

    // The source comes back; --failed retries where it failed.
    proxy.set(0);
    let (ok, out, err) = run(&["warm", "t", "--failed", "--store", &store.url()]);
    assert!(ok, "warm --failed: {out}{err}");
    wait_for("READY 4/4", Duration::from_secs(60), || {
        replicas(&store, "t") == "READY 4/4"
    });

    // A node that joins later warms it by itself.
    nodes.push(DaemonProc::start_member(
        &store.url(),
        &dir.path().join("late"),
        &["--peer-token", "secret"],
    ));
    wait_for("READY 5/5", Duration::from_secs(60), || {
        replicas(&store, "t") == "READY 5/5"
    });
    assert_eq!(
        support::metric(
            &store.url(),
            "lazyblk_store_replicas{template=\"t\",phase=\"READY\"}"
        ),
        5.0
    );

    // unwarm: the nodes unpin it (no longer READY), the template is still served.
    let (ok, out, err) = run(&["unwarm", "t", "--store", &store.url()]);
    assert!(ok, "unwarm: {out}{err}");
    wait_for("nodes to unpin", Duration::from_secs(30), || {
        !replicas(&store, "t").starts_with("READY")
    });

    // A killed node drops out after its lease.
    nodes[0].kill9();
    wait_for("the killed node to leave", Duration::from_secs(30), || {
        live(&store) == 4
    });
    let out = dir.path().join("read");
    let (ok, _, err) = sh("nbdcopy", &[&nodes[1].nbd_uri("t"), out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(std::fs::read(out).unwrap() == std::fs::read(&image).unwrap());
}

#[test]
fn delete_is_refused_while_in_use_and_gc_keeps_what_others_need() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let shared = pattern(6 << 20, 42);
    let base = make_ext4(dir.path(), 16, &[("shared", shared.clone())]);
    let child = make_ext4(
        dir.path(),
        16,
        &[("shared", shared), ("extra", pattern(1 << 20, 43))],
    );
    publish(&store.url(), &base, "base");
    publish(&store.url(), &child, "child");
    let node = DaemonProc::start_member(&store.url(), &dir.path().join("n"), &[]);
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "base",
        "--sandbox",
        "sb1",
        "--node",
        &node.url(),
    ]);
    assert!(ok, "{out}{err}");
    // A heartbeat reports the user (every 2 s; later on a loaded machine).
    wait_for("the store to see sb1's use of base", SETTLE, || {
        users_of(&store, "base").contains(&"overlay sb1".to_string())
    });
    let (ok, _, err) = run(&["delete", "base", "--store", &store.url()]);
    assert!(!ok, "delete of a template in use succeeded");
    assert!(
        err.contains("in use") && err.contains("overlay sb1") && err.contains(&node.url()),
        "{err}"
    );

    let (ok, out, err) = run(&["overlay", "delete", "sb1", "--node", &node.url()]);
    assert!(ok, "{out}{err}");
    wait_for("the store to see base unused", SETTLE, || {
        users_of(&store, "base").is_empty()
    });
    let (ok, out, err) = run(&["delete", "base", "--store", &store.url()]);
    assert!(ok, "delete after the overlay is gone: {out}{err}");
    let (ok, out, err) = run(&["gc", "--grace", "0s", "--store", &store.url()]);
    assert!(ok, "gc: {out}{err}");
    let fresh = DaemonProc::start(&store.url(), &dir.path().join("fresh"), &[]);
    let copy = dir.path().join("child.out");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&fresh.nbd_uri("child"), copy.to_str().unwrap()],
    );
    assert!(ok, "the child after gc: {err}");
    assert!(std::fs::read(copy).unwrap() == std::fs::read(&child).unwrap());
}

#[test]
fn a_label_policy_marks_old_templates_stale() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 44))]);
    for (id, version) in [("old", "1.4.1"), ("new", "1.10.0")] {
        let (ok, out, err) = run(&[
            "publish",
            image.to_str().unwrap(),
            "--template",
            id,
            "--store",
            &store.url(),
            "--label",
            &format!("guest_agent={version}"),
        ]);
        assert!(ok, "{out}{err}");
    }
    let (ok, out, err) = run(&[
        "policy",
        "set",
        "guest_agent",
        ">=1.4.2",
        "--store",
        &store.url(),
    ]);
    assert!(ok, "policy set: {out}{err}");
    let stale = json(&["templates", "--stale", "--json", "--store", &store.url()]);
    let ids: Vec<&str> = stale
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["template"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["old"], "{stale}");
    let (ok, out, _) = run(&["templates", "--store", &store.url()]);
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("old") && l.contains("STALE")),
        "{out}"
    );
    let labelled = json(&[
        "templates",
        "--label",
        "guest_agent=1.10.0",
        "--json",
        "--store",
        &store.url(),
    ]);
    assert_eq!(labelled.as_array().unwrap().len(), 1);
    assert_eq!(
        support::metric(
            &store.url(),
            "lazyblk_store_template_stale{template=\"old\"}"
        ),
        1.0
    );
    // A STALE template is still served.
    let node = DaemonProc::start(&store.url(), &dir.path().join("n"), &[]);
    let (ok, _, err) = sh("nbdinfo", &["--size", &node.nbd_uri("old")]);
    assert!(ok, "{err}");
    let (ok, _, _) = run(&[
        "policy",
        "set",
        "guest_agent",
        "banana",
        "--store",
        &store.url(),
    ]);
    assert!(!ok, "a bad policy is refused");
}

#[test]
fn wishes_survive_a_store_restart_and_bad_wishes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = StoreProc::start();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(2 << 20, 45))]);
    publish(&store.url(), &image, "t");
    let (ok, _, err) = run(&["warm", "nosuch", "--all-nodes", "--store", &store.url()]);
    assert!(!ok && err.contains("unknown template"), "{err}");
    let (ok, _, err) = run(&["warm", "t", "--nodes", "ghost", "--store", &store.url()]);
    assert!(!ok && err.contains("no live node"), "{err}");
    // Two operators, one after the other: the last word wins, and both see it.
    let (ok, out, err) = run(&["warm", "t", "--all-nodes", "--store", &store.url()]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(&["warm", "t", "--min-replicas", "1", "--store", &store.url()]);
    assert!(ok, "{out}{err}");
    let wishes = |url: &str| {
        let (_, body) = support::http_get(&format!("{url}/v1/wishes")).unwrap();
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let before = wishes(&store.url());
    assert_eq!(before[0]["placement"]["min_replicas"], 1, "{before}");
    store.restart();
    let after = wishes(&store.url());
    assert_eq!(
        after[0]["placement"]["min_replicas"], 1,
        "wishes kept across a restart: {after}"
    );
    // The membership is rebuilt from the next heartbeats, and the wish acted on.
    let node = DaemonProc::start_member(&store.url(), &dir.path().join("n"), &[]);
    wait_for("READY 1/1", Duration::from_secs(30), || {
        replicas(&store, "t") == "READY 1/1"
    });
    drop(node);
}
