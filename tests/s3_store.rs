//! `lazyblk store --backend s3://...` against a real S3-compatible server (Garage on
//! loopback, started by scripts/garage.sh): publish, serve a daemon byte for byte,
//! verified chunk uploads, immutable manifests, durability from the bucket, gc.
//!
//! Skipped (with a message) when `garage` is not on PATH and `LAZYBLK_S3_TEST` is
//! unset; with `LAZYBLK_S3_TEST=1` the script installs Garage first (cargo install).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lazyblk_cache::Digest;
use serde_json::Value;
use support::buckets::Garage;
use support::node::{sh, DaemonProc};
use support::{free_port, lazyblk, make_ext4, pattern, publish, run, wait_http};

const CHUNK: usize = 1 << 20;

/// A `lazyblk store` process over a bucket prefix; killed on drop.
struct S3Store {
    child: Child,
    port: u16,
}

impl S3Store {
    fn start(garage: &Garage, backend: &str) -> S3Store {
        let port = free_port();
        let mut cmd = lazyblk();
        cmd.args(["store", "--backend", backend])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("LAZYBLK_WRITE_TOKEN")
            .env_remove("LAZYBLK_READ_TOKEN")
            .stdin(Stdio::null());
        for (k, v) in &garage.env {
            cmd.env(k, v);
        }
        let store = S3Store {
            child: cmd.spawn().expect("starting lazyblk store"),
            port,
        };
        wait_http(&format!("{}/healthz", store.url()));
        store
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 request with a body: (status, response body).
fn http_send(method: &str, url: &str, body: &[u8]) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_at(rest.find('/').expect("a path"));
    let mut stream = TcpStream::connect(host).expect("connecting to the store");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("setting a timeout");
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("sending");
    stream.write_all(body).expect("sending the body");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("reading the answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn durability(store_url: &str, id: &str) -> String {
    let (ok, out, err) = run(&["templates", "--json", "--store", store_url]);
    assert!(ok, "templates: {err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == id)
        .map(|t| t["durability"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn an_s3_bucket_backs_the_store() {
    let Some(garage) = Garage::start() else {
        eprintln!(
            "skipping the S3 store test: garage is not on PATH \
             (cargo install garage --locked, or set LAZYBLK_S3_TEST=1 to install it)"
        );
        return;
    };
    let endpoint = garage.var("LAZYBLK_S3_ENDPOINT");
    let backend = format!("s3://lazyblk/test?endpoint={endpoint}");
    let store = S3Store::start(&garage, &backend);
    let tmp = tempfile::tempdir().unwrap();
    let files = vec![
        ("etc/os-release", b"NAME=lazyblk-s3\n".to_vec()),
        ("usr/bin/big", pattern(3 * CHUNK + 777, 11)),
        ("home/user/notes.txt", pattern(50_000, 12)),
    ];
    let image = make_ext4(tmp.path(), 32, &files);
    publish(&store.url(), &image, "s3t");

    // A daemon serves the template from the bucket byte for byte: a small read from
    // the blocks that hold it (ranges of the chunk's object in the bucket), then all.
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let image_bytes = std::fs::read(&image).unwrap();
    assert_eq!(
        support::pread_4k(&daemon.nbd_uri("s3t"), 12288).unwrap(),
        image_bytes[12288..12288 + 4096]
    );
    assert!(
        support::metric(&store.url(), "lazyblk_store_ranges_served_total") >= 2.0,
        "the small read fetched the chunk's table and a block, by range"
    );
    let copy = tmp.path().join("copy.img");
    let (ok, _, err) = sh("nbdcopy", &[&daemon.nbd_uri("s3t"), copy.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap(),
        "the export differs from the image"
    );

    // A body that does not hash to its digest is refused and not stored.
    let body = pattern(64 << 10, 13);
    let other = Digest::of(&pattern(64 << 10, 14));
    let chunk_url = format!("{}/v1/chunks/{other}", store.url());
    let (status, answer) = http_send("PUT", &chunk_url, &body);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("digest mismatch"), "{answer}");
    assert_eq!(http_send("GET", &chunk_url, b"").0, 404);
    let right = format!("{}/v1/chunks/{}", store.url(), Digest::of(&body));
    assert_eq!(http_send("PUT", &right, &body).0, 201);
    assert_eq!(http_send("HEAD", &right, b"").0, 200);

    // Publishing again is a no-op; other content under the id is refused.
    publish(&store.url(), &image, "s3t");
    let manifests = support::metric(&store.url(), "lazyblk_store_manifests_published_total");
    assert_eq!(manifests, 1.0, "re-publishing stored a manifest again");
    let changed = make_ext4(tmp.path(), 32, &[("etc/os-release", b"other\n".to_vec())]);
    let (ok, out, err) = run(&[
        "publish",
        changed.to_str().unwrap(),
        "--template",
        "s3t",
        "--store",
        &store.url(),
    ]);
    assert!(!ok, "publishing other content under s3t succeeded: {out}");
    assert!(err.contains("already exists"), "{err}");

    assert_eq!(durability(&store.url(), "s3t"), "DURABLE");
    // gc sweeps the unreferenced chunks (the extra one, the refused publish's) and
    // keeps every chunk of the template.
    let (ok, out, err) = run(&["gc", "--grace", "0s", "--json", "--store", &store.url()]);
    assert!(ok, "gc: {err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["chunks_deleted"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(http_send("HEAD", &right, b"").0, 404);
    assert_eq!(durability(&store.url(), "s3t"), "DURABLE");

    // The bucket, not the store process, holds the data: a new process sees it all.
    drop(store);
    let again = S3Store::start(&garage, &backend);
    assert_eq!(durability(&again.url(), "s3t"), "DURABLE");
    let (status, _) = support::http_get(&format!("{}/v1/templates/s3t/manifest", again.url()))
        .expect("reading the manifest");
    assert_eq!(status, 200);
}

/// Issue 11: a daemon on `--store s3://...` reads manifests and chunks straight from the
/// bucket, with no store process at all; `publish --store s3://...` writes there
/// directly (a manifest only if absent). Then a second daemon reads the first one's
/// commit through the bucket once it is uploaded.
#[test]
fn a_daemon_reads_the_bucket_directly_without_a_store_process() {
    let Some(garage) = Garage::start() else {
        eprintln!("skipping the direct S3 test: garage is not on PATH");
        return;
    };
    let endpoint = garage.var("LAZYBLK_S3_ENDPOINT");
    let bucket = format!("s3://lazyblk/direct?endpoint={endpoint}");
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(
        tmp.path(),
        32,
        &[("usr/bin/big", pattern(9 * CHUNK + 5, 21))],
    );
    let with_env = |mut cmd: Command| {
        for (k, v) in &garage.env {
            cmd.env(k, v);
        }
        cmd
    };
    let mut publish = with_env(lazyblk());
    let out = publish
        .args([
            "publish",
            image.to_str().unwrap(),
            "--template",
            "direct",
            "--store",
            &bucket,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish to the bucket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same content again is a no-op; other content under the id is refused.
    let other = make_ext4(tmp.path(), 32, &[("x", b"other".to_vec())]);
    let out = with_env(lazyblk())
        .args([
            "publish",
            other.to_str().unwrap(),
            "--template",
            "direct",
            "--store",
            &bucket,
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "other content under the same id was published"
    );

    let http = free_port();
    let cache = tmp.path().join("cache");
    let sock = cache.join("nbd.sock");
    let mut daemon = with_env(lazyblk())
        .args([
            "daemon",
            "--cache",
            cache.to_str().unwrap(),
            "--store",
            &bucket,
        ])
        .args(["--listen", &format!("127.0.0.1:{http}")])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{http}/healthz"));
    let copy = tmp.path().join("copy.img");
    let uri = format!("nbd+unix:///direct?socket={}", sock.display());
    // A small read fetches blocks by ranged GETs of the object itself.
    let small = support::pread_4k(&uri, 12288);
    let blocks = support::metric_sum(
        &format!("http://127.0.0.1:{http}"),
        "lazyblk_fetched_blocks_total",
    );
    let (ok, _, err) = sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(ok, "nbdcopy from a daemon on the bucket: {err}");
    let image_bytes = std::fs::read(&image).unwrap();
    assert_eq!(small.unwrap(), image_bytes[12288..12288 + 4096]);
    assert!(blocks >= 1.0, "the small read was not answered from blocks");
    assert!(std::fs::read(&copy).unwrap() == image_bytes);
    let (ok, out, err) = {
        let o = with_env(lazyblk())
            .args(["templates", "--store", &bucket, "--json"])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert!(ok, "templates on the bucket: {err}");
    assert!(out.contains("\"direct\""), "{out}");
}

/// Issue 29: manifests read straight from a bucket are checked like those from a store
/// server: the signature is kept beside the manifest (`manifests/<id>.sig`), and a
/// daemon with `--trusted-keys` serves the signed template and refuses the unsigned one.
#[test]
fn a_daemon_on_a_bucket_checks_signatures_too() {
    let Some(garage) = Garage::start() else {
        eprintln!("skipping the signed S3 test: garage is not on PATH");
        return;
    };
    let endpoint = garage.var("LAZYBLK_S3_ENDPOINT");
    let bucket = format!("s3://lazyblk/signed?endpoint={endpoint}");
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 8, &[("a", pattern(CHUNK + 7, 5))]);
    let key = tmp.path().join("release.pem");
    let (ok, public, err) = run(&["keygen", key.to_str().unwrap()]);
    assert!(ok, "keygen: {err}");
    let trusted = tmp.path().join("trusted-keys");
    std::fs::write(&trusted, &public).unwrap();
    let lazyblk_env = || {
        let mut cmd = lazyblk();
        for (k, v) in &garage.env {
            cmd.env(k, v);
        }
        cmd
    };
    for (id, signed) in [("signed", true), ("unsigned", false)] {
        let mut cmd = lazyblk_env();
        cmd.args(["publish", image.to_str().unwrap(), "--template", id])
            .args(["--store", &bucket]);
        if signed {
            cmd.args(["--signing-key", key.to_str().unwrap()]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "publish {id} to the bucket: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let http = free_port();
    let cache = tmp.path().join("cache");
    let sock = cache.join("nbd.sock");
    let mut daemon = lazyblk_env()
        .args([
            "daemon",
            "--cache",
            cache.to_str().unwrap(),
            "--store",
            &bucket,
        ])
        .args(["--listen", &format!("127.0.0.1:{http}")])
        .args(["--trusted-keys", trusted.to_str().unwrap()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{http}/healthz"));
    let node = format!("http://127.0.0.1:{http}");
    let copy = |id: &str| {
        let uri = format!("nbd+unix:///{id}?socket={}", sock.display());
        let to = tmp.path().join(format!("{id}.img"));
        let (ok, _, _) = sh("nbdcopy", &[&uri, to.to_str().unwrap()]);
        ok.then(|| std::fs::read(&to).unwrap())
    };
    let signed = copy("signed");
    let unsigned = copy("unsigned");
    let (status_ok, out, err) = run(&["status", "unsigned", "--node", &node]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        signed == Some(std::fs::read(&image).unwrap()),
        "signed not served"
    );
    assert!(unsigned.is_none(), "the unsigned template was served");
    assert!(
        !status_ok && format!("{out}{err}").contains("not signed"),
        "{out}{err}"
    );
}
