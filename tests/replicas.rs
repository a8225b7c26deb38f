//! Issue 28: a control plane with no single server. Several `lazyblk store --shared`
//! over one backend answer alike: wishes, policy and deletes through either, no update
//! lost when operators race through both, the fleet's leases seen by both, one server
//! killed and the fleet goes on. Over a directory (two servers on one root), over
//! Azurite (the Azure emulator, scripts/azurite.sh) and over Garage (which ignores
//! conditional writes: the shared mode refuses it).

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::buckets::{Azurite, Garage};
use support::node::{nbdsh, DaemonProc};
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
fn wishes_of_an_earlier_store_are_moved_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir_all(root.join("center")).unwrap();
    // What a store of 7440fc6 kept: every wish in one document.
    std::fs::write(
        root.join("center/wishes.json"),
        r#"{"old": {"template": "old", "placement": "all_nodes", "redo": 3}}"#,
    )
    .unwrap();
    let a = Server::start(&["--root", root.to_str().unwrap()], &[]);
    let listed = wishes(&a.url());
    assert_eq!(listed["old"]["redo"], 3, "{listed:?}");
    assert!(
        !root.join("center/wishes.json").exists(),
        "moved, not kept twice"
    );
    assert!(root.join("center/wishes/old.json").exists());
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
    ok(&[
        "policy",
        "set",
        "guest_agent",
        ">=1.4.2",
        "--store",
        &b.url(),
    ]);
    let stale = template(&a.url(), "w001").unwrap();
    assert_eq!(stale["stale"], true, "{stale}");
    ok(&["delete", "w001", "--store", &a.url()]);
    assert!(template(&b.url(), "w001").is_none());
    ok(&["unwarm", "w002", "--store", &a.url()]);
    wait_for("the unwarm through the other server", CONVERGE, || {
        !wishes(&b.url()).contains_key("w002")
    });
}

/// The container both servers share in Azurite, and the backend URL over it.
const AZ_BACKEND: &str = "az://fleet/lazyblk?emulator=true";

#[test]
fn two_servers_over_azurite_carry_a_fleet_through_the_death_of_one() {
    let Some(azurite) = Azurite::start("fleet") else {
        eprintln!("skipping: Azurite could not be installed or started (npm install azurite)");
        return;
    };
    let env = [("AZURITE_BLOB_STORAGE_URL", azurite.url.as_str())];
    let mut a = Server::start(&["--backend", AZ_BACKEND], &env);
    let b = Server::start(&["--backend", AZ_BACKEND], &env);
    let (au, bu) = (a.url(), b.url());
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 8, &[("f", pattern(3 << 20, 28))]);
    race_wishes(&au, &bu, &image, &[]);
    for id in (0..100).map(|i| format!("w{i:03}")) {
        ok(&["unwarm", &id, "--store", &au]);
    }

    // Four daemons, two of them through each server first.
    let a_first = format!("{au},{bu}");
    let b_first = format!("{bu},{au}");
    let nodes: Vec<DaemonProc> = (0..4)
        .map(|i| {
            let stores = if i < 2 { &a_first } else { &b_first };
            DaemonProc::start_member(stores, &tmp.path().join(format!("n{i}")), &[])
        })
        .collect();
    wait_for("both servers list the same 4 nodes", CONVERGE, || {
        let (x, y) = (node_ids(&au), node_ids(&bu));
        x.len() == 4 && x == y
    });

    ok(&["warm", "w003", "--all-nodes", "--store", &au]);
    for server in [&au, &bu] {
        wait_for("READY 4/4 through both servers", CONVERGE, || {
            replicas(server, "w003") == "READY 4/4"
        });
    }
    ok(&["policy", "set", "guest_agent", ">=1.4.2", "--store", &bu]);
    let stale = template(&au, "w003").unwrap();
    assert_eq!(
        stale["stale"], true,
        "policy through B, seen through A: {stale}"
    );
    ok(&["unwarm", "w003", "--store", &bu]);
    wait_for("the unwarm through B, seen through A", CONVERGE, || {
        !wishes(&au).contains_key("w003")
    });
    ok(&["delete", "w004", "--store", &bu]);
    assert!(template(&au, "w004").is_none(), "deleted through B");

    // A dies; the nodes that renewed through it go on through B.
    a.kill9();
    // Longer than a lease: a node that had not moved to B would have dropped out.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(node_ids(&bu).len(), 4, "every node renews through B");
    ok(&["warm", "w005", "--all-nodes", "--store", &a_first]);
    wait_for("READY 4/4 after A died", CONVERGE, || {
        replicas(&bu, "w005") == "READY 4/4"
    });
    // A commit on a node whose first store server is dead publishes through B.
    let node = &nodes[0];
    ok(&[
        "overlay",
        "create",
        "w005",
        "--sandbox",
        "sb",
        "--node",
        &node.url(),
    ]);
    let (done, out, err) = nbdsh(
        &node.nbd_uri("sb"),
        "h.pwrite(b'committed' * 7282, 1 << 20)\nh.flush()",
    );
    assert!(done, "writing the sandbox: {out}{err}");
    ok(&["commit", "sb", "--template", "c1", "--node", &node.url()]);
    wait_for("the commit DURABLE through B", CONVERGE, || {
        template(&bu, "c1").is_some_and(|t| t["durability"] == "DURABLE")
    });
    ok(&["delete", "w006", "--store", &a_first]);
    assert!(template(&bu, "w006").is_none(), "deleted through A,B");
}

#[test]
fn garage_is_refused_for_shared_mode_and_works_alone() {
    let Some(garage) = Garage::start() else {
        eprintln!("skipping: garage is not on PATH (scripts/garage.sh installs it)");
        return;
    };
    let backend = format!(
        "s3://lazyblk/shared?endpoint={}",
        garage.var("LAZYBLK_S3_ENDPOINT")
    );
    let mut cmd = lazyblk();
    cmd.args(["store", "--backend", &backend, "--shared"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null());
    for (k, v) in &garage.env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--shared over Garage must refuse to start"
    );
    assert!(
        err.contains("does not honour conditional writes"),
        "the refusal names why: {err}"
    );
    // One server alone still works over it.
    let port = free_port();
    let mut cmd = lazyblk();
    cmd.args(["store", "--backend", &backend])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null());
    for (k, v) in &garage.env {
        cmd.env(k, v);
    }
    let mut alone = Server {
        child: Some(cmd.spawn().unwrap()),
        port,
    };
    wait_http(&format!("{}/healthz", alone.url()));
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 8, &[("f", pattern(1 << 20, 3))]);
    publish_many(&alone.url(), &image, &["g1".to_string()], &[]);
    ok(&["warm", "g1", "--min-replicas", "2", "--store", &alone.url()]);
    ok(&["warm", "g1", "--failed", "--store", &alone.url()]);
    assert_eq!(wishes(&alone.url())["g1"]["redo"], 1);
    alone.kill9();
}

/// A proxy in front of a bucket that, once armed, answers some writes itself as a
/// bucket under contention does: every third PUT 503 (Slow Down / Server Busy), every
/// fifth conditional PUT 409 (a conflicting write), without forwarding them.
struct FlakyBucket {
    url: String,
    armed: Arc<AtomicBool>,
    faults: Arc<AtomicU64>,
}

impl FlakyBucket {
    fn start(upstream: &str) -> FlakyBucket {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Keep the path (Azurite's account name) and change only the address.
        let rest = upstream.trim_start_matches("http://");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let url = format!("http://127.0.0.1:{port}/{path}");
        let host = host.to_string();
        let armed = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let (a, f) = (armed.clone(), faults.clone());
        let puts = Arc::new(AtomicU64::new(0));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (host, a, f, puts) = (host.clone(), a.clone(), f.clone(), puts.clone());
                std::thread::spawn(move || {
                    let _ = forward_flaky(client, &host, &a, &f, &puts);
                });
            }
        });
        FlakyBucket { url, armed, faults }
    }
}

fn forward_flaky(
    mut client: TcpStream,
    upstream: &str,
    armed: &AtomicBool,
    faults: &AtomicU64,
    puts: &AtomicU64,
) -> std::io::Result<()> {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if client.read(&mut byte)? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let header = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        client.read_exact(&mut body)?;
        if text.starts_with("PUT ") && armed.load(Ordering::SeqCst) {
            let n = puts.fetch_add(1, Ordering::SeqCst);
            let conditional = header("if-match").is_some() || header("if-none-match").is_some();
            let answer: Option<&[u8]> = if n.is_multiple_of(3) {
                Some(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            } else if conditional && n % 5 == 1 {
                Some(b"HTTP/1.1 409 Conflict\r\ncontent-length: 0\r\n\r\n")
            } else {
                None
            };
            if let Some(answer) = answer {
                faults.fetch_add(1, Ordering::SeqCst);
                client.write_all(answer)?;
                continue;
            }
        }
        let head = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
        let mut up = TcpStream::connect(upstream)?;
        up.write_all(head.as_bytes())?;
        up.write_all(&body)?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        client.write_all(&answer)?;
        return Ok(());
    }
}

#[test]
fn a_bucket_answering_409_and_503_loses_no_update() {
    let Some(azurite) = Azurite::start("flaky") else {
        eprintln!("skipping: Azurite could not be installed or started (npm install azurite)");
        return;
    };
    let flaky = FlakyBucket::start(&azurite.url);
    let env = [("AZURITE_BLOB_STORAGE_URL", flaky.url.as_str())];
    let backend = "az://flaky/lazyblk?emulator=true";
    let a = Server::start(&["--backend", backend], &env);
    let b = Server::start(&["--backend", backend], &env);
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 8, &[("f", pattern(1 << 20, 5))]);
    let ids: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    publish_many(&a.url(), &image, &ids, &[]);
    flaky.armed.store(true, Ordering::SeqCst);
    let (au, bu) = (a.url(), b.url());
    let mut commands: Vec<Vec<String>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let via = if i % 2 == 0 { &au } else { &bu };
            ["warm", id, "--all-nodes", "--store", via]
                .map(str::to_string)
                .to_vec()
        })
        .collect();
    all_at_once(commands.clone());
    commands = (0..20)
        .map(|i| {
            let via = if i % 2 == 0 { &au } else { &bu };
            ["warm", "f00", "--failed", "--store", via]
                .map(str::to_string)
                .to_vec()
        })
        .collect();
    all_at_once(commands);
    flaky.armed.store(false, Ordering::SeqCst);
    assert!(
        flaky.faults.load(Ordering::SeqCst) > 0,
        "the proxy failed some writes"
    );
    for server in [&au, &bu] {
        wait_for("every wish through a flaky bucket", CONVERGE, || {
            let w = wishes(server);
            ids.iter().all(|id| w.contains_key(id)) && w["f00"]["redo"] == 20
        });
    }
}

/// libfaketime, which moves a process's clock (Debian's `faketime` package).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_server_with_its_clock_off_and_one_killed_mid_update() {
    if !Path::new(LIBFAKETIME).exists() {
        eprintln!("skipping: faketime is not installed (apt-get install faketime)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let root_arg = root.to_str().unwrap();
    let mut a = Server::start(&["--root", root_arg], &[]);
    // Two hours ahead: far past the 2 minutes of skew a signed lease may have.
    let ahead = [("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", "+2h")];
    let skewed = Server::start(&["--root", root_arg], &ahead);
    let (au, bu) = (a.url(), skewed.url());
    let image = make_ext4(dir.path(), 8, &[("f", pattern(2 << 20, 9))]);
    let ids: Vec<String> = (0..30).map(|i| format!("k{i:02}")).collect();
    publish_many(&au, &image, &ids, &[]);

    // The skewed server refuses every signed lease (its clock says they are two hours
    // old); the nodes that try it first renew through the other, and both servers
    // still list the same nodes, their ages measured on each one's own clock.
    let b_first = format!("{bu},{au}");
    let _nodes: Vec<DaemonProc> = (0..2)
        .map(|i| DaemonProc::start_member(&b_first, &dir.path().join(format!("n{i}")), &[]))
        .collect();
    wait_for("both servers list the same 2 nodes", CONVERGE, || {
        let (x, y) = (node_ids(&au), node_ids(&bu));
        x.len() == 2 && x == y
    });
    ok(&["warm", "k00", "--all-nodes", "--store", &bu]);
    wait_for("READY 2/2 through the skewed server", CONVERGE, || {
        replicas(&bu, "k00") == "READY 2/2"
    });
    assert_eq!(replicas(&au, "k00"), "READY 2/2");

    // A server killed while it records wishes: every wish it confirmed is there, and
    // every stored wish is whole.
    let listed = killed_while_recording_wishes(&mut a, &bu, &ids[1..]);
    // The same root, served again: the same wishes.
    let again = Server::start(&["--root", root_arg], &[]);
    wait_for(
        "the restarted server lists the same wishes",
        CONVERGE,
        || wishes(&again.url()).keys().eq(listed.keys()),
    );
}

/// Kills `a` while it records a wish for each of `ids` (all at once): every wish it
/// confirmed is listed through `other` and every stored wish is whole (the listing
/// parses each document). What `other` lists afterwards.
fn killed_while_recording_wishes(
    a: &mut Server,
    other: &str,
    ids: &[String],
) -> std::collections::BTreeMap<String, Value> {
    let au = a.url();
    let confirmed: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let au = au.clone();
                s.spawn(move || {
                    let (ok, _, _) = run(&["warm", id, "--min-replicas", "1", "--store", &au]);
                    ok.then(|| id.clone())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        a.kill9();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    });
    let listed = wishes(other);
    for id in &confirmed {
        assert!(listed.contains_key(id), "wish {id} confirmed, then lost");
    }
    for wish in listed.values() {
        assert!(
            wish["placement"].is_object() || wish["placement"].is_string(),
            "{wish}"
        );
    }
    listed
}

/// The same over Azurite: a server killed while it records wishes loses none it
/// confirmed and leaves none half written, and the other goes on.
#[test]
fn a_server_killed_mid_update_over_azurite_loses_no_confirmed_wish() {
    let Some(azurite) = Azurite::start("killed-mid") else {
        eprintln!("skipping: Azurite could not be installed or started (npm install azurite)");
        return;
    };
    let env = [("AZURITE_BLOB_STORAGE_URL", azurite.url.as_str())];
    let backend = "az://killed-mid/lazyblk?emulator=true";
    let mut a = Server::start(&["--backend", backend], &env);
    let b = Server::start(&["--backend", backend], &env);
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 8, &[("f", pattern(1 << 20, 31))]);
    let ids: Vec<String> = (0..30).map(|i| format!("m{i:02}")).collect();
    publish_many(&a.url(), &image, &ids, &[]);
    let listed = killed_while_recording_wishes(&mut a, &b.url(), &ids);
    // The survivor still takes updates of every template, those A left included.
    for id in &ids {
        ok(&["warm", id, "--min-replicas", "2", "--store", &b.url()]);
    }
    let after = wishes(&b.url());
    assert!(
        ids.iter()
            .all(|id| after[id]["placement"]["min_replicas"] == 2),
        "{after:?}"
    );
    assert!(listed.len() <= ids.len());
}
