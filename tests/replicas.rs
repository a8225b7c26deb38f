//! Issue 28: a control plane with no single server. Several `lazyblk store --shared`
//! over one backend answer alike: wishes, policy and deletes through either, no update
//! lost when operators race through both, the fleet's leases seen by both, one server
//! killed and the fleet goes on. Over a directory (two servers on one root), over
//! Azurite (the Azure emulator, scripts/azurite.sh) and over Garage (which ignores
//! conditional writes: the shared mode refuses it).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{free_port, lazyblk, make_ext4, pattern, run, wait_http};

/// The flags that make a store server one of several over one backend.
const SHARED: &[&str] = &["--shared"];
/// How long a change made through one server may take to show through the other:
/// the servers exchange lease views every 2 s and re-list wishes every second; this is
/// generous for a loaded machine.
const CONVERGE: Duration = Duration::from_secs(40);

/// A store server over a given backend; killed on drop.
struct Server {
    child: Option<Child>,
    port: u16,
}

impl Server {
    /// `lazyblk store` with `backend` args (`--root DIR` or `--backend URL`), `SHARED`
    /// and `env`.
    fn start(backend: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut cmd = lazyblk();
        cmd.arg("store")
            .args(backend)
            .args(SHARED)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("LAZYBLK_WRITE_TOKEN")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting lazyblk store");
        let server = Server {
            child: Some(child),
            port,
        };
        wait_http(&format!("{}/healthz", server.url()));
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn json_of(args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut cmd = lazyblk();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lazyblk {}: {text}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn json(args: &[&str]) -> Value {
    json_of(args, &[])
}

fn ok(args: &[&str]) {
    let (ok, out, err) = run(args);
    assert!(ok, "lazyblk {}: {out}{err}", args.join(" "));
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `GET /v1/wishes` of a server: template to wish.
fn wishes(server: &str) -> std::collections::BTreeMap<String, Value> {
    let (status, body) = support::http_get(&format!("{server}/v1/wishes")).unwrap();
    assert_eq!(status, 200, "{body}");
    let list: Vec<Value> = serde_json::from_str(&body).unwrap();
    list.into_iter()
        .map(|w| (w["template"].as_str().unwrap().to_string(), w))
        .collect()
}

/// The REPLICAS column of `id` as `server` lists it.
fn replicas(server: &str, id: &str) -> String {
    json(&["templates", "--json", "--store", server])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == id)
        .and_then(|t| t["replicas"]["status"].as_str())
        .unwrap_or("")
        .to_string()
}

fn template(server: &str, id: &str) -> Option<Value> {
    json(&["templates", "--json", "--store", server])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == id)
        .cloned()
}

/// The ids of the live nodes `server` lists.
fn node_ids(server: &str) -> Vec<String> {
    let mut ids: Vec<String> = json(&["nodes", "--json", "--store", server])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Publishes `image` under each of `ids` through `store`, a few at a time.
fn publish_many(store: &str, image: &Path, ids: &[String], env: &[(&str, &str)]) {
    std::thread::scope(|s| {
        for batch in ids.chunks(ids.len().div_ceil(6)) {
            s.spawn(move || {
                for id in batch {
                    let mut cmd = lazyblk();
                    cmd.args(["publish", image.to_str().unwrap(), "--template", id])
                        .args(["--store", store]);
                    for (k, v) in env {
                        cmd.env(k, v);
                    }
                    let out = cmd.output().unwrap();
                    assert!(
                        out.status.success(),
                        "publish {id}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
}

/// Runs `lazyblk ARGS` for each argument list at once (each its own process), asserting
/// every one succeeded.
fn all_at_once(commands: Vec<Vec<String>>) {
    std::thread::scope(|s| {
        let handles: Vec<_> = commands
            .iter()
            .map(|args| {
                s.spawn(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    (args.join(" "), run(&args))
                })
            })
            .collect();
        for h in handles {
            let (what, (ok, out, err)) = h.join().unwrap();
            assert!(ok, "lazyblk {what}: {out}{err}");
        }
    });
}

/// The races the issue names, through two servers: 100 wishes for different templates
/// all present afterwards; 20 wishes for one template end with one of them whole; 20
/// `warm --failed` of one template count 20 (no increment lost).
fn race_wishes(a: &str, b: &str, image: &Path, env: &[(&str, &str)]) {
    let ids: Vec<String> = (0..100).map(|i| format!("w{i:03}")).collect();
    publish_many(a, image, &ids, env);
    all_at_once(
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let via = if i % 2 == 0 { a } else { b };
                ["warm", id, "--min-replicas", "1", "--store", via]
                    .map(str::to_string)
                    .to_vec()
            })
            .collect(),
    );
    for server in [a, b] {
        wait_for("100 wishes through both servers", CONVERGE, || {
            wishes(server).len() >= 100
        });
        let listed = wishes(server);
        let missing: Vec<&String> = ids.iter().filter(|id| !listed.contains_key(*id)).collect();
        assert!(missing.is_empty(), "{server} lost wishes {missing:?}");
    }

    all_at_once(
        (1..=20)
            .map(|k| {
                let via = if k % 2 == 0 { a } else { b };
                let k = k.to_string();
                ["warm", "w000", "--min-replicas", &k, "--store", via]
                    .map(str::to_string)
                    .to_vec()
            })
            .collect(),
    );
    all_at_once(
        (0..20)
            .map(|i| {
                let via = if i % 2 == 0 { a } else { b };
                ["warm", "w000", "--failed", "--store", via]
                    .map(str::to_string)
                    .to_vec()
            })
            .collect(),
    );
    wait_for("both servers agree on w000", CONVERGE, || {
        wishes(a).get("w000") == wishes(b).get("w000")
    });
    let wish = &wishes(a)["w000"];
    let k = wish["placement"]["min_replicas"].as_u64().unwrap_or(0);
    assert!((1..=20).contains(&k), "one of the 20 wishes, whole: {wish}");
    assert_eq!(wish["redo"], 20, "every warm --failed counted: {wish}");
}

#[test]
fn two_servers_over_one_directory_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let root_arg = root.to_str().unwrap();
    let a = Server::start(&["--root", root_arg], &[]);
    let b = Server::start(&["--root", root_arg], &[]);
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 7))]);
    race_wishes(&a.url(), &b.url(), &image, &[]);

    // Policy through one, seen through the other; a delete through the other.
    ok(&["policy", "set", "guest_agent", ">=1.4.2", "--store", &b.url()]);
    let stale = template(&a.url(), "w001").unwrap();
    assert_eq!(stale["stale"], true, "{stale}");
    ok(&["delete", "w001", "--store", &a.url()]);
    assert!(template(&b.url(), "w001").is_none());
    ok(&["unwarm", "w002", "--store", &a.url()]);
    wait_for("the unwarm through the other server", CONVERGE, || {
        !wishes(&b.url()).contains_key("w002")
    });
}
