//! The node's durable state in one room (issue 30): a daemon that has written every
//! store of its state (its key, a READY replica's phase, a wish acted on, saved
//! manifests, a commit intent whose upload is owed, a sandbox) is SIGKILLed, and the
//! next start reads every one back, through the HTTP API: the same node id, the same
//! phases, the intent still owed, the sandbox open, the wish kept; and with the store
//! gone, the saved manifests serve their templates from local chunks alone.
//!
//! `LAZYBLK_WRITER_BIN` names the binary that writes the state before the kill (default:
//! the binary under test): given an older lazyblk's, the test checks that an upgrade
//! reads the directory an older node left.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::node::sh;
use support::{free_port, http_get, make_ext4, pattern, publish, run, wait_for, StoreProc};

/// How long a daemon gets to start or to settle a state: generous for a loaded
/// machine; waits end as soon as the state is seen.
const SETTLE: Duration = Duration::from_secs(90);

/// One node's cache and addresses, kept across its restarts.
struct Node {
    cache: PathBuf,
    http: u16,
    nbd: u16,
}

/// A daemon process, SIGKILLed when dropped (also when a check fails).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Node {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// Starts `bin` as this node's daemon over `store` and waits until it answers.
    fn start(&self, bin: &Path, store: &str, extra: &[&str]) -> Running {
        let mut cmd = std::process::Command::new(bin);
        if std::env::var_os("LAZYBLK_LOG").is_none() {
            cmd.env("LAZYBLK_LOG", "error");
        }
        let child = cmd
            .arg("daemon")
            .arg("--cache")
            .arg(&self.cache)
            .args(["--store", store])
            .args(["--listen", &format!("127.0.0.1:{}", self.http)])
            .args(["--nbd", &format!("127.0.0.1:{}", self.nbd)])
            .args(["--advertise", &self.url()])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting lazyblk daemon");
        let running = Running(child);
        support::wait_http(&format!("{}/healthz", self.url()));
        running
    }

    fn get(&self, path: &str) -> Value {
        let (code, body) = http_get(&format!("{}{path}", self.url())).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn cli(&self, args: &[&str]) {
        let url = self.url();
        let mut all = args.to_vec();
        all.extend(["--node", &url]);
        let (ok, out, err) = run(&all);
        assert!(ok, "lazyblk {}: {out}{err}", args.join(" "));
    }

    /// Each replica's phase and local chunks, by template.
    fn replicas(&self) -> Vec<(String, String, u64, u64)> {
        let mut all: Vec<_> = self
            .get("/v1/templates")
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["phase"] == "READY")
            .map(|r| {
                (
                    r["template"].as_str().unwrap_or("").to_string(),
                    r["phase"].as_str().unwrap_or("").to_string(),
                    r["local_chunks"].as_u64().unwrap_or(0),
                    r["stored_chunks"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect();
        all.sort();
        all
    }

    fn wishes(&self) -> Value {
        let bytes = std::fs::read(self.cache.join("wished.json")).unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }
}

fn nbd_read(port: u16, export: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    let uri = format!("nbd://127.0.0.1:{port}/{export}");
    let (ok, _, err) = sh("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert!(ok, "nbdcopy {export}: {err}");
    std::fs::read(out).unwrap()
}

/// Waits until child's upload is owed again (the intent is settled against the store
/// in the background after start; until then child shows no durability).
fn owes_child(node: &Node) -> bool {
    matches!(
        node.get("/v1/templates/child")["durability"].as_str(),
        Some("ORIGIN_ONLY" | "UPLOADING")
    )
}

#[test]
fn a_killed_node_reads_back_every_store_of_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let base = make_ext4(dir.path(), 16, &[("a", pattern(6 << 20, 11))]);
    let wanted = make_ext4(dir.path(), 16, &[("w", pattern(5 << 20, 12))]);
    publish(&store.url(), &base, "base");
    publish(&store.url(), &wanted, "wanted");
    let base_bytes = std::fs::read(&base).unwrap();
    let writer = std::env::var_os("LAZYBLK_WRITER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(support::bin);
    let node = Node {
        cache: dir.path().join("cache"),
        http: free_port(),
        nbd: free_port(),
    };
    let hold_upload = ["--upload-delay", "3600"];

    // Every store written by the writer's daemon.
    let daemon = node.start(&writer, &store.url(), &hold_upload);
    let node_id = node.get("/v1/node")["node_id"].clone();
    node.cli(&["warm", "base", "--wait"]);
    let (ok, out, err) = run(&["warm", "wanted", "--all-nodes", "--store", &store.url()]);
    assert!(ok, "warm --all-nodes: {out}{err}");
    wait_for("the wish acted on", SETTLE, || {
        node.wishes().get("wanted").is_some()
            && node.get("/v1/templates/wanted")["phase"] == "READY"
    });
    node.cli(&["overlay", "create", "base", "--sandbox", "sb"]);
    let mut child_bytes = base_bytes.clone();
    child_bytes[8 << 20..9 << 20].copy_from_slice(&pattern(1 << 20, 13));
    let written = dir.path().join("child.img");
    std::fs::write(&written, &child_bytes).unwrap();
    let target = format!("nbd://127.0.0.1:{}/sb", node.nbd);
    let (ok, _, err) = sh("nbdcopy", &[written.to_str().unwrap(), &target]);
    assert!(ok, "nbdcopy into sb: {err}");
    node.cli(&["commit", "sb", "--template", "child"]);
    node.cli(&["overlay", "create", "base", "--sandbox", "open-sb"]);
    wait_for("child's upload owed", SETTLE, || owes_child(&node));
    let replicas = node.replicas();
    let names: Vec<&str> = replicas.iter().map(|r| r.0.as_str()).collect();
    assert!(
        names.contains(&"base") && names.contains(&"wanted"),
        "{replicas:?}"
    );
    let wishes = node.wishes();
    drop(daemon);

    // The next start (the binary under test) reads every one back.
    let daemon = node.start(&support::bin(), &store.url(), &hold_upload);
    assert_eq!(node.get("/v1/node")["node_id"], node_id, "node id changed");
    wait_for("the READY replicas READY again", SETTLE, || {
        node.replicas() == replicas
    });
    for (template, _, local, stored) in node.replicas() {
        assert_eq!(local, stored, "{template} READY without every chunk");
    }
    wait_for("child's upload owed again", SETTLE, || owes_child(&node));
    assert!(node.cache.join("originated").join("child").exists());
    let sandboxes = node.get("/v1/overlays").to_string();
    assert!(
        sandboxes.contains("open-sb"),
        "the open sandbox is gone: {sandboxes}"
    );
    assert_eq!(node.wishes(), wishes, "the wishes acted on changed");
    drop(daemon);

    // With the store gone, the saved manifests serve their templates from local
    // chunks, and the intent is kept until the store can be asked.
    let gone = format!("http://127.0.0.1:{}", free_port());
    drop(store);
    let daemon = node.start(&support::bin(), &gone, &hold_upload);
    assert_eq!(node.get("/v1/node")["node_id"], node_id);
    wait_for("base READY without the store", SETTLE, || {
        node.get("/v1/templates/base")["phase"] == "READY"
    });
    let read = nbd_read(node.nbd, "base", &dir.path().join("base.read"));
    assert!(read == base_bytes, "base read back wrong without the store");
    let read = nbd_read(node.nbd, "child", &dir.path().join("child.read"));
    assert!(
        read == child_bytes,
        "child read back wrong without the store"
    );
    assert!(node.cache.join("originated").join("child").exists());
    drop(daemon);
}
