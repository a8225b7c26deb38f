//! The daemon SIGKILLed during its own start-up (issue 30): at each step of the sequence
//! `src/daemon/startup.rs` names (the daemon kills itself there when
//! `LAZYBLK_KILL_AT_STARTUP_STEP` names the step) and at random moments after it is
//! spawned, while a commit still owes its upload, a fill runs and a sandbox is open.
//! After every kill the next start must show:
//! - the node id unchanged;
//! - the commit intent kept (the node still owes the upload of the committed template,
//!   and at the end uploads it: the store's copy reads back byte for byte);
//! - no replica READY without its chunks (and at the end, with the store gone, the
//!   READY template reads back right from local chunks alone).
//!
//! `LAZYBLK_STARTUP_KILLS` sets the kills (default 24, at least one per step).

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{free_port, http_get, lazyblk, make_ext4, pattern, publish, run, StoreProc};

/// The steps of `lazyblk::daemon::startup::Step`, in order.
const STEPS: [&str; 9] = [
    "cache-opened",
    "node-identity",
    "templates-restored",
    "sandboxes-restored",
    "commits-resumed",
    "fills-restored",
    "listeners-bound",
    "devices-restored",
    "serving",
];

/// How long a daemon gets to start, to die at its step, or to settle a state.
const SETTLE: Duration = Duration::from_secs(60);
/// The longest random delay between spawning a daemon and killing it: a debug build
/// starts in tens of milliseconds, so most random kills land inside start-up, and some
/// just after it, while the restored fills and the commit's settle task run.
const MAX_KILL_DELAY_MS: u64 = 400;

fn kills() -> usize {
    std::env::var("LAZYBLK_STARTUP_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
        .max(STEPS.len())
}

/// A small deterministic generator, so a failing round can be replayed by its seed.
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

/// One node's cache and addresses, kept across its restarts.
struct Node {
    cache: PathBuf,
    store: String,
    http: u16,
    nbd: u16,
    extra: Vec<String>,
}

impl Node {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    fn spawn(&self, kill_at: Option<&str>) -> Running {
        let mut cmd = lazyblk();
        cmd.arg("daemon")
            .arg("--cache")
            .arg(&self.cache)
            .args(["--store", &self.store])
            .args(["--listen", &format!("127.0.0.1:{}", self.http)])
            .args(["--nbd", &format!("127.0.0.1:{}", self.nbd)])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(step) = kill_at {
            cmd.env("LAZYBLK_KILL_AT_STARTUP_STEP", step);
        }
        Running(cmd.spawn().expect("starting lazyblk daemon"))
    }

    /// Starts the daemon and waits until it answers.
    fn start(&self) -> Running {
        let child = self.spawn(None);
        support::wait_http(&format!("{}/healthz", self.url()));
        child
    }

    fn get(&self, path: &str) -> Value {
        let (code, body) = http_get(&format!("{}{path}", self.url())).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// A daemon process, SIGKILLed when dropped (also when a check fails).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill9(daemon: Running) {
    drop(daemon);
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nbd_read(port: u16, export: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    let uri = format!("nbd://127.0.0.1:{port}/{export}");
    let (ok, _, err) = sh("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert!(ok, "nbdcopy {export}: {err}");
    std::fs::read(out).unwrap()
}

/// What every start after a kill must show.
fn check(node: &Node, node_id: &str, round: &str) {
    let info = node.get("/v1/node");
    assert_eq!(info["node_id"], node_id, "{round}: the node id changed");
    assert!(
        node.cache.join("originated").join("child").exists(),
        "{round}: the commit intent of child is gone"
    );
    // The intent is settled against the store in the background after start: until
    // then the template shows no durability.
    let deadline = Instant::now() + SETTLE;
    loop {
        let child = node.get("/v1/templates/child");
        match child["durability"].as_str() {
            Some("ORIGIN_ONLY" | "UPLOADING") => break,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => panic!("{round}: the node no longer owes child's upload: {child}"),
        }
    }
    for r in node.get("/v1/templates").as_array().unwrap() {
        if r["phase"] == "READY" {
            assert_eq!(
                r["local_chunks"], r["stored_chunks"],
                "{round}: READY without every chunk: {r}"
            );
        }
    }
}

#[test]
fn killed_at_every_startup_step_the_node_keeps_its_id_intents_and_ready_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Some(StoreProc::start());
    let store_url = store.as_ref().unwrap().url();
    let base = make_ext4(dir.path(), 16, &[("a", pattern(6 << 20, 1))]);
    let big = make_ext4(dir.path(), 48, &[("b", pattern(40 << 20, 2))]);
    publish(&store_url, &base, "base");
    publish(&store_url, &big, "big");
    let base_bytes = std::fs::read(&base).unwrap();

    // The state a crash must keep: a READY replica, a commit whose upload waits (its
    // intent on disk), a sandbox, and a slow fill under way.
    let node = Node {
        cache: dir.path().join("cache"),
        store: store_url.clone(),
        http: free_port(),
        nbd: free_port(),
        extra: ["--upload-delay", "3600", "--fill-rate", "4M"]
            .map(String::from)
            .to_vec(),
    };
    let daemon = node.start();
    let node_id = node.get("/v1/node")["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = node.url();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--node", &url]);
        let (ok, out, err) = run(&all);
        assert!(ok, "lazyblk {}: {out}{err}", args.join(" "));
    };
    cli(&["warm", "base", "--wait"]);
    cli(&["overlay", "create", "base", "--sandbox", "sb"]);
    let mut child_bytes = base_bytes.clone();
    child_bytes[8 << 20..9 << 20].copy_from_slice(&pattern(1 << 20, 3));
    let written = dir.path().join("child.img");
    std::fs::write(&written, &child_bytes).unwrap();
    let (ok, _, err) = sh(
        "nbdcopy",
        &[
            written.to_str().unwrap(),
            &format!("nbd://127.0.0.1:{}/sb", node.nbd),
        ],
    );
    assert!(ok, "nbdcopy into sb: {err}");
    cli(&["commit", "sb", "--template", "child"]);
    cli(&["overlay", "create", "base", "--sandbox", "open-sb"]);
    cli(&["warm", "big"]);
    check(&node, &node_id, "before any kill");
    kill9(daemon);

    // Every step once, in a shuffled order, then random steps and random moments.
    let seed = std::env::var("LAZYBLK_STARTUP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut rng = Lcg(seed);
    let mut order: Vec<usize> = (0..STEPS.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let (mut at_steps, mut at_moments) = (0, 0);
    for round in 0..kills() {
        let point = match order.get(round) {
            Some(&step) => Some(step),
            None if rng.next().is_multiple_of(2) => Some(rng.next() as usize % STEPS.len()),
            None => None,
        };
        let what = match point {
            Some(step) => {
                let mut dying = node.spawn(Some(STEPS[step]));
                let deadline = Instant::now() + SETTLE;
                let status = loop {
                    if let Some(status) = dying.0.try_wait().unwrap() {
                        break status;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: never reached step {}",
                        STEPS[step]
                    );
                    std::thread::sleep(Duration::from_millis(20));
                };
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "round {round}: the daemon ended otherwise than killed at {}: {status:?}",
                    STEPS[step]
                );
                at_steps += 1;
                format!(
                    "round {round} (seed {seed}): killed at step {}",
                    STEPS[step]
                )
            }
            None => {
                let delay = rng.next() % MAX_KILL_DELAY_MS;
                let dying = node.spawn(None);
                std::thread::sleep(Duration::from_millis(delay));
                kill9(dying);
                at_moments += 1;
                format!("round {round} (seed {seed}): killed {delay} ms after spawn")
            }
        };
        let daemon = node.start();
        check(&node, &node_id, &what);
        kill9(daemon);
    }
    eprintln!("start-up kills: {at_steps} at named steps, {at_moments} at random moments");

    // The upload allowed again: the intent is kept until child is DURABLE, and the
    // store's copy is what the sandbox held.
    let node = Node {
        extra: vec!["--fill-rate".into(), "4M".into()],
        ..node
    };
    let daemon = node.start();
    assert_eq!(node.get("/v1/node")["node_id"], node_id.as_str());
    wait_for("child DURABLE", || {
        node.get("/v1/templates/child")["durability"] == "DURABLE"
    });
    assert!(!node.cache.join("originated").join("child").exists());
    wait_for("big READY", || {
        node.get("/v1/templates/big")["phase"] == "READY"
    });
    kill9(daemon);
    let reader = DaemonProc::start(&store_url, &dir.path().join("reader"), &[]);
    let read = nbd_read(reader.nbd_port, "child", &dir.path().join("child.read"));
    assert!(read == child_bytes, "child as the store holds it differs");
    drop(reader);

    // The store gone: READY replicas read back from their local chunks alone.
    store.take();
    let daemon = node.start();
    wait_for("base READY again", || {
        node.get("/v1/templates/base")["phase"] == "READY"
    });
    let read = nbd_read(node.nbd, "base", &dir.path().join("base.read"));
    assert!(read == base_bytes, "base read back wrong without the store");
    kill9(daemon);
}
