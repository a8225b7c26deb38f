//! Issue 24: a commit waits on its store alone. With a store that takes a second per
//! request and a publish held at a gate, sandbox creates on the node are answered while
//! the commit is still under way; a second commit or a delete of the committing sandbox
//! gets a clear refusal; a commit of another sandbox goes on beside it; the commits then
//! publish the right bytes. A daemon killed
//! (SIGKILL) while its publish is in flight comes back consistent: the commit is
//! resumed (uploaded, DURABLE) when the store got the manifest, and released (nothing
//! left, the id free again) when it did not.

mod support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::node::{sh, DaemonProc};
use support::proxy::{Proxy, Publishes};
use support::{http_get, lazyblk, pattern, publish, run, StoreProc};

/// The slow store: every request through the proxy is held this long.
const STORE_DELAY: Duration = Duration::from_secs(1);
/// A generous bound for a step that takes a few store round trips.
const STEP_BOUND: Duration = Duration::from_secs(45);
/// The template: 8 chunks of 1 MiB.
const TEMPLATE_SIZE: usize = 8 << 20;

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Waits for `what` to hold, within [`STEP_BOUND`].
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP_BOUND;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A store with template `t`, a proxy in front of it, and a daemon over the proxy with
/// sandbox `sb` over `t`, whose writes make the bytes returned.
struct Setup {
    tmp: tempfile::TempDir,
    store: StoreProc,
    proxy: Proxy,
    node: DaemonProc,
    /// What `sb` holds, and so what a commit of it must publish.
    expected: Vec<u8>,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let base = pattern(TEMPLATE_SIZE, 1);
    let image = tmp.path().join("t.img");
    std::fs::write(&image, &base).unwrap();
    publish(&store.url(), &image, "t");
    let proxy = Proxy::start(&store.url(), 0);
    let node = DaemonProc::start(&proxy.url, &tmp.path().join("node"), &[]);
    overlay_create(&node, "t", "sb").expect("creating sb");
    // Two of the eight chunks change, one of them only in part.
    let mut expected = base;
    expected[(2 << 20)..(3 << 20)].copy_from_slice(&pattern(1 << 20, 2));
    expected[(5 << 20) + 4096..(5 << 20) + 8192].copy_from_slice(&pattern(4096, 3));
    let edited = tmp.path().join("sb.img");
    std::fs::write(&edited, &expected).unwrap();
    let (ok, _, err) = sh(
        "nbdcopy",
        &["--flush", edited.to_str().unwrap(), &node.nbd_uri("sb")],
    );
    assert!(ok, "nbdcopy into sb: {err}");
    Setup {
        tmp,
        store,
        proxy,
        node,
        expected,
    }
}

fn overlay_create(node: &DaemonProc, template: &str, sandbox: &str) -> Result<(), String> {
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        template,
        "--sandbox",
        sandbox,
        "--node",
        &node.url(),
    ]);
    ok.then_some(()).ok_or(format!("{out}{err}"))
}

/// `lazyblk commit SB --template ID --json`, started and left running.
fn start_commit(node: &DaemonProc, sandbox: &str, id: &str) -> Child {
    lazyblk()
        .args(["commit", sandbox, "--template", id, "--json"])
        .args(["--node", &node.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lazyblk commit")
}

/// Waits for a commit started with [`start_commit`]: its report, or what it printed.
fn finish_commit(child: Child) -> Result<Value, String> {
    let out = child
        .wait_with_output()
        .expect("waiting for lazyblk commit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        serde_json::from_str(&stdout).map_err(|e| format!("{e}: {stdout}"))
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn read_export(node: &DaemonProc, export: &str, to: &Path) -> Vec<u8> {
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri(export), to.to_str().unwrap()]);
    assert!(ok, "nbdcopy of {export}: {err}");
    std::fs::read(to).unwrap()
}

fn json(url: &str) -> (u16, Value) {
    let (status, body) = http_get(url).unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn store_durability(store: &StoreProc, id: &str) -> Option<String> {
    let (status, summary) = json(&format!("{}/v1/templates/{id}", store.url()));
    (status == 200).then(|| summary["durability"].as_str().unwrap_or("").to_string())
}

/// The commit intents the node keeps on disk.
fn intents(node: &DaemonProc) -> Vec<String> {
    match std::fs::read_dir(node.cache.join("originated")) {
        Ok(dir) => dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn sandbox_creates_are_not_delayed_by_a_commit_on_a_slow_store() {
    let s = setup();
    s.proxy.delay_every(STORE_DELAY);
    s.proxy.publishes(Publishes::Hold);
    let mut commit = start_commit(&s.node, "sb", "t2");
    wait_for("the commit's publish to reach the store", || {
        s.proxy.publishes_held() >= 1
    });

    // The commit waits on its store: creates on the node go on meanwhile.
    for sandbox in ["sb1", "sb2", "sb3"] {
        let created = std::thread::scope(|scope| {
            let create = scope.spawn(|| overlay_create(&s.node, "t", sandbox));
            wait_for(&format!("the create of {sandbox} to be answered"), || {
                create.is_finished()
            });
            create.join().unwrap()
        });
        assert_eq!(created, Ok(()), "create of {sandbox}");
        assert!(
            commit.try_wait().unwrap().is_none(),
            "{sandbox} was created only after the commit had finished"
        );
    }
    let (_, sb) = json(&format!("{}/v1/overlays/sb", s.node.url()));
    assert_eq!(
        sb["committing"], "t2",
        "the commit is shown under way: {sb}"
    );
    let (ok, listing, err) = run(&["overlay", "list", "--node", &s.node.url()]);
    assert!(ok, "{err}");
    let line = listing
        .lines()
        .find(|l| l.starts_with("sb "))
        .unwrap_or_default();
    assert!(line.ends_with("(committing as t2)"), "{listing}");

    // The committing sandbox and the reserved id are refused, saying why.
    let (ok, out, err) = run(&["commit", "sb", "--template", "t3", "--node", &s.node.url()]);
    assert!(!ok && err.contains("being committed"), "{out}{err}");
    let (ok, out, err) = run(&["overlay", "delete", "sb", "--node", &s.node.url()]);
    assert!(!ok && err.contains("being committed"), "{out}{err}");
    let (ok, out, err) = run(&[
        "overlay",
        "delete",
        "sb",
        "--force",
        "--node",
        &s.node.url(),
    ]);
    assert!(!ok && err.contains("being committed"), "{out}{err}");
    let taken = overlay_create(&s.node, "t", "t2").expect_err("a sandbox took t2");
    assert!(taken.contains("being committed"), "{taken}");
    let (ok, out, err) = run(&["commit", "sb1", "--template", "t2", "--node", &s.node.url()]);
    assert!(!ok && err.contains("t2"), "{out}{err}");
    assert!(
        commit.try_wait().unwrap().is_none(),
        "the commit finished early"
    );
    // A commit of another sandbox does not wait for this one: both reach the store.
    let other = start_commit(&s.node, "sb1", "t3");
    wait_for("the second commit's publish to reach the store", || {
        s.proxy.publishes_held() >= 2
    });

    // Let the publishes through: each commit publishes what its sandbox holds.
    s.proxy.delay_every(Duration::ZERO);
    s.proxy.publishes(Publishes::Pass);
    let outcome = finish_commit(other).expect("the commit of sb1");
    assert_eq!(outcome["new_chunks"], 0, "sb1 was not written: {outcome}");
    let read = read_export(&s.node, "t3", &s.tmp.path().join("t3.img"));
    assert_eq!(sha256(&read), sha256(&pattern(TEMPLATE_SIZE, 1)), "t3 is t");
    let outcome = finish_commit(commit).expect("the commit");
    assert_eq!(outcome["template"], "t2", "{outcome}");
    assert_eq!(outcome["new_chunks"], 2, "{outcome}");
    let (_, sb) = json(&format!("{}/v1/overlays/sb", s.node.url()));
    assert!(sb["committing"].is_null(), "{sb}");
    let read = read_export(&s.node, "t2", &s.tmp.path().join("t2.img"));
    assert_eq!(
        sha256(&read),
        sha256(&s.expected),
        "t2 as the node serves it"
    );
    wait_for("t2 to be DURABLE in the store", || {
        store_durability(&s.store, "t2").as_deref() == Some("DURABLE")
    });
    assert!(intents(&s.node).is_empty(), "{:?}", intents(&s.node));
    // A node that never saw the sandbox reads the same bytes from the store.
    let cold = DaemonProc::start(&s.store.url(), &s.tmp.path().join("cold"), &[]);
    let read = read_export(&cold, "t2", &s.tmp.path().join("t2-cold.img"));
    assert_eq!(sha256(&read), sha256(&s.expected), "t2 read from the store");
    // The sandbox is free again once the commit is done.
    let (ok, out, err) = run(&["overlay", "delete", "sb", "--node", &s.node.url()]);
    assert!(ok, "{out}{err}");
}

/// Kills the node while its commit of `sb` as `t2` waits at the publish gate.
fn kill_during_publish(s: &mut Setup) {
    s.proxy.delay_every(STORE_DELAY);
    s.proxy.publishes(Publishes::Hold);
    let commit = start_commit(&s.node, "sb", "t2");
    wait_for("the commit's publish to reach the store", || {
        s.proxy.publishes_held() >= 1
    });
    assert_eq!(
        intents(&s.node),
        vec!["t2".to_string()],
        "the intent before the publish"
    );
    s.node.kill9();
    assert!(
        finish_commit(commit).is_err(),
        "the commit answered from a dead node"
    );
    s.proxy.delay_every(Duration::ZERO);
}

#[test]
fn a_commit_killed_after_the_store_got_its_publish_is_resumed() {
    let mut s = setup();
    kill_during_publish(&mut s);
    // The publish the dead node sent reaches the store after all.
    s.proxy.publishes(Publishes::Pass);
    wait_for("the store to have t2", || {
        store_durability(&s.store, "t2").is_some()
    });
    assert_eq!(
        store_durability(&s.store, "t2").as_deref(),
        Some("ORIGIN_ONLY")
    );
    s.node.restart();
    wait_for("t2 to be DURABLE in the store", || {
        store_durability(&s.store, "t2").as_deref() == Some("DURABLE")
    });
    wait_for("the intent to be cleared", || intents(&s.node).is_empty());
    let (_, t2) = json(&format!("{}/v1/templates/t2", s.node.url()));
    assert_eq!(t2["durability"], "DURABLE", "{t2}");
    let read = read_export(&s.node, "t2", &s.tmp.path().join("t2.img"));
    assert_eq!(sha256(&read), sha256(&s.expected));
    let cold = DaemonProc::start(&s.store.url(), &s.tmp.path().join("cold"), &[]);
    let read = read_export(&cold, "t2", &s.tmp.path().join("t2-cold.img"));
    assert_eq!(sha256(&read), sha256(&s.expected), "t2 read from the store");
}

#[test]
fn a_commit_killed_before_the_store_got_its_publish_is_released() {
    let mut s = setup();
    kill_during_publish(&mut s);
    // The publish never reaches the store.
    s.proxy.publishes(Publishes::Drop);
    s.node.restart();
    // The manifest goes before the intent.
    wait_for("the intent to be released", || intents(&s.node).is_empty());
    assert!(
        !s.node.cache.join("manifests").join("t2.json").exists(),
        "the unpublished manifest stayed"
    );
    let (status, t2) = json(&format!("{}/v1/templates/t2", s.node.url()));
    assert_eq!(status, 404, "t2 on the node after the restart: {t2}");
    assert_eq!(store_durability(&s.store, "t2"), None);
    // The sandbox is intact and the id is free: the commit can be made again.
    s.proxy.publishes(Publishes::Pass);
    let outcome = finish_commit(start_commit(&s.node, "sb", "t2")).expect("the second commit");
    assert_eq!(outcome["new_chunks"], 2, "{outcome}");
    let read = read_export(&s.node, "t2", &s.tmp.path().join("t2.img"));
    assert_eq!(sha256(&read), sha256(&s.expected));
}
