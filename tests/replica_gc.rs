//! Issue 28, gc across store servers: a chunk one server confirmed to a publisher (the
//! missing list said "stored, don't upload it") survives a gc through another server
//! within the grace period, over Azurite and over one directory; a gc killed in the
//! middle of its sweep does not hold up later confirmations for long.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::buckets::Azurite;
use support::node::{sh, DaemonProc};
use support::{free_port, lazyblk, make_ext4, manifest_json, pattern, run, wait_http};

/// The grace period of the gc runs here: long enough that "confirm through A, then gc
/// through B" always falls inside it on a loaded machine, short enough to wait out.
const GRACE_SECS: u64 = 20;

/// A `lazyblk store --shared` over `backend` args; killed on drop.
struct Server {
    child: Option<Child>,
    port: u16,
}

impl Server {
    fn start(backend: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut cmd = lazyblk();
        cmd.arg("store")
            .args(backend)
            .arg("--shared")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("LAZYBLK_WRITE_TOKEN")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let server = Server {
            child: Some(cmd.spawn().expect("starting lazyblk store")),
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

/// `curl` with a JSON body: (status, body).
fn curl(method: &str, url: &str, body: &str) -> (u16, String) {
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sS",
            "--max-time",
            "120",
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            "-w",
            "\n%{http_code}",
            url,
        ],
    );
    assert!(ok, "curl {method} {url}: {err}");
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Every digest a manifest names (its chunks and its block index pages).
fn digests(manifest: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                out.push(s.clone())
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(manifest, &mut out);
    out.sort();
    out.dedup();
    out
}

fn gc(store: &str, grace_secs: u64, env: &[(&str, &str)]) -> Value {
    let mut cmd = lazyblk();
    let grace = format!("{grace_secs}s");
    cmd.args(["gc", "--json", "--grace", &grace, "--store", store]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "gc through {store}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The publish the issue describes, taken apart so a gc runs in the middle: the chunks
/// of template `old` are left over (it is deleted) and older than the grace period; a
/// publisher asks A which of them are missing (none: A confirms every one), a gc runs
/// through B, then the publisher puts its manifest through A. Every chunk must still
/// be there: the template is DURABLE and a daemon reads the image back whole.
fn confirmed_then_gc_elsewhere(
    a: &str,
    b: &str,
    image: &Path,
    work: &Path,
    daemon_store: &str,
    env: &[(&str, &str)],
) {
    let publish = |id: &str| {
        let mut cmd = lazyblk();
        cmd.args(["publish", image.to_str().unwrap(), "--template", id])
            .args(["--store", a]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "publish {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    publish("old");
    let mut manifest = manifest_json(a, "old");
    let wanted = digests(&manifest);
    assert!(wanted.len() > 3, "the image has chunks: {manifest}");
    let (ok, out, err) = run(&["delete", "old", "--store", a]);
    assert!(ok, "delete old: {out}{err}");
    // Older than the grace period: only the confirmation keeps them now.
    std::thread::sleep(Duration::from_secs(GRACE_SECS + 2));

    let (status, body) = curl(
        "POST",
        &format!("{a}/v1/chunks/missing"),
        &serde_json::to_string(&wanted).unwrap(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "[]", "every chunk is still stored: {body}");
    let report = gc(b, GRACE_SECS, env);

    manifest["template"] = "new".into();
    let (status, body) = curl(
        "PUT",
        &format!("{a}/v1/templates/new/manifest"),
        &manifest.to_string(),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let listed: Value = {
        let (ok, out, err) = run(&["templates", "--json", "--store", b]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let new = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == "new")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        new["durability"], "DURABLE",
        "{new}; the gc through B between the confirmation and the manifest: {report}"
    );
    assert_eq!(report["chunks_deleted"], 0, "gc through B: {report}");

    // Read back through a daemon.
    let cache = work.join("cache");
    let mut daemon = DaemonProc::start(daemon_store, &cache, &[]);
    let copy = work.join("copy");
    let uri = daemon.nbd_uri("new");
    let (ok, _, err) = sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    daemon.kill9();
    assert!(ok, "nbdcopy of the new template: {err}");
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(image).unwrap(),
        "the template reads back as the image"
    );
}

#[test]
fn a_chunk_confirmed_through_one_server_survives_gc_through_another_over_azurite() {
    let Some(azurite) = Azurite::start("gcsweep") else {
        eprintln!("skipping: Azurite could not be installed or started (npm install azurite)");
        return;
    };
    let env = [("AZURITE_BLOB_STORAGE_URL", azurite.url.as_str())];
    let backend = "az://gcsweep/lazyblk?emulator=true";
    let a = Server::start(&["--backend", backend], &env);
    let b = Server::start(&["--backend", backend], &env);
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 8, &[("f", pattern(3 << 20, 41))]);
    confirmed_then_gc_elsewhere(&a.url(), &b.url(), &image, tmp.path(), &a.url(), &env);
}

/// libfaketime, which moves a process's clock (Debian's `faketime` package).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_chunk_confirmed_through_one_server_survives_gc_through_another_over_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let root_arg = root.to_str().unwrap();
    // With faketime installed, the confirming server's clock is an hour behind and the
    // gc's an hour ahead: neither a confirmation nor gc's age of a chunk may depend on
    // the clock of the process that makes it.
    let faked = Path::new(LIBFAKETIME).exists();
    if !faked {
        eprintln!("faketime is not installed: both servers keep the real time");
    }
    let clock = |offset: &'static str| -> Vec<(&str, &str)> {
        if faked {
            vec![("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", offset)]
        } else {
            Vec::new()
        }
    };
    let a = Server::start(&["--root", root_arg], &clock("-1h"));
    let b = Server::start(&["--root", root_arg], &clock("+1h"));
    let image = make_ext4(tmp.path(), 8, &[("f", pattern(3 << 20, 43))]);
    confirmed_then_gc_elsewhere(&a.url(), &b.url(), &image, tmp.path(), &b.url(), &[]);
}

/// A proxy in front of Azurite that, once armed, holds every delete without answering
/// it (a gc stuck in its sweep), and counts the DELETEs it held.
struct StallingProxy {
    url: String,
    armed: Arc<AtomicBool>,
    held: Arc<AtomicU64>,
}

impl StallingProxy {
    fn start(upstream: &str) -> StallingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rest = upstream.trim_start_matches("http://");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let url = format!("http://127.0.0.1:{port}/{path}");
        let host = host.to_string();
        let armed = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let (a, h) = (armed.clone(), held.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (host, a, h) = (host.clone(), a.clone(), h.clone());
                std::thread::spawn(move || {
                    let _ = forward(client, &host, &a, &h);
                });
            }
        });
        StallingProxy { url, armed, held }
    }
}

fn forward(
    mut client: TcpStream,
    upstream: &str,
    armed: &AtomicBool,
    held: &AtomicU64,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let length: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    let line = text.lines().next().unwrap_or("");
    // A delete: one blob's, or a batch of them (`POST ...?comp=batch`).
    let delete = line.starts_with("DELETE ") || line.contains("comp=batch");
    if delete && armed.load(Ordering::SeqCst) {
        held.fetch_add(1, Ordering::SeqCst);
        // Never answered: the connection stays open until the client goes away.
        let _ = client.read(&mut byte);
        return Ok(());
    }
    let head = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    client.write_all(&answer)
}

/// A gc killed while it deletes (its deletes held by a proxy, then the server killed):
/// confirmations through another server wait for it at most a bounded time and then
/// go on, a publish through it succeeds, and a later gc runs.
#[test]
fn a_gc_killed_mid_sweep_does_not_block_confirmations_for_ever() {
    let Some(azurite) = Azurite::start("killed") else {
        eprintln!("skipping: Azurite could not be installed or started (npm install azurite)");
        return;
    };
    let proxy = StallingProxy::start(&azurite.url);
    let backend = "az://killed/lazyblk?emulator=true";
    let env = [("AZURITE_BLOB_STORAGE_URL", azurite.url.as_str())];
    let a = Server::start(&["--backend", backend], &env);
    let mut g = Server::start(
        &["--backend", backend],
        &[("AZURITE_BLOB_STORAGE_URL", proxy.url.as_str())],
    );
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 8, &[("f", pattern(3 << 20, 45))]);
    let image2 = make_ext4(tmp.path(), 8, &[("g", pattern(3 << 20, 46))]);
    let (au, gu) = (a.url(), g.url());
    let (ok, out, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "x",
        "--store",
        &au,
    ]);
    assert!(ok, "publish x: {out}{err}");
    let manifest = manifest_json(&au, "x");
    let wanted = digests(&manifest);
    let (ok, out, err) = run(&["delete", "x", "--store", &au]);
    assert!(ok, "{out}{err}");

    // A gc through G, its deletes held: killed once the proxy holds one.
    proxy.armed.store(true, Ordering::SeqCst);
    let gc_run = {
        let gu = gu.clone();
        std::thread::spawn(move || run(&["gc", "--grace", "0s", "--store", &gu]))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.held.load(Ordering::SeqCst) == 0 {
        if gc_run.is_finished() || Instant::now() > deadline {
            panic!("the gc never reached its deletes: {:?}", gc_run.join());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    g.kill9();
    let _ = gc_run.join();

    // The chunks the dead gc may have been deleting: a confirmation through A answers
    // (after waiting out the dead gc, within the client's own deadline) and says which
    // are missing; a publish through A that needs them succeeds and reads back.
    let (status, body) = curl(
        "POST",
        &format!("{au}/v1/chunks/missing"),
        &serde_json::to_string(&wanted).unwrap(),
    );
    assert_eq!(status, 200, "{body}");
    let (ok, out, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "y",
        "--store",
        &au,
    ]);
    assert!(ok, "publish after a gc died: {out}{err}");
    // Later confirmations do not wait again.
    let started = Instant::now();
    let (ok, out, err) = run(&[
        "publish",
        image2.to_str().unwrap(),
        "--template",
        "z",
        "--store",
        &au,
    ]);
    assert!(ok, "{out}{err}");
    let waited = started.elapsed();
    let report = gc(&au, 0, &env);
    assert_eq!(report["chunks_deleted"], 0, "nothing left over: {report}");
    let cache = tmp.path().join("cache");
    let mut daemon = DaemonProc::start(&au, &cache, &[]);
    let copy = tmp.path().join("copy");
    let uri = daemon.nbd_uri("y");
    let (ok, _, err) = sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    daemon.kill9();
    assert!(ok, "nbdcopy: {err}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap());
    eprintln!("a publish after the dead gc was cleared took {waited:?}");
}
