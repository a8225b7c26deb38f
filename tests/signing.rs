//! Issue 29, signed templates: manifests signed with `--signing-key` (or a node's key,
//! for its commits), daemons and stores with `--trusted-keys` that serve and publish
//! only what a trusted key signed, and the bad signatures and revoked keys they refuse.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{make_ext4, pattern, run, StoreProc};

/// How long a test waits for something a daemon does in the background.
const SETTLE: Duration = Duration::from_secs(30);

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `lazyblk keygen FILE`: the key's public half in hex.
fn keygen(path: &Path) -> String {
    let (ok, out, err) = run(&["keygen", path.to_str().unwrap()]);
    assert!(ok, "keygen: {out}{err}");
    out.trim().to_string()
}

/// A key made with openssl, the form operators provision; its public half as
/// `lazyblk keygen --json` would print it is read back through a publish's signature.
fn openssl_key(path: &Path) {
    let (ok, _, err) = sh(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            path.to_str().unwrap(),
        ],
    );
    assert!(ok, "openssl genpkey: {err}");
}

/// The public key of a node whose cache directory is `cache` (made now if new).
fn node_key(cache: &Path) -> String {
    let (ok, out, err) = run(&["node-key", "--cache", cache.to_str().unwrap(), "--json"]);
    assert!(ok, "node-key: {err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    doc["public_key"].as_str().unwrap().to_string()
}

/// `lazyblk publish`, signed with `key` when given: (success, stdout and stderr).
fn publish(store: &str, image: &Path, id: &str, key: Option<&Path>) -> (bool, String) {
    let mut args = vec![
        "publish".to_string(),
        image.to_str().unwrap().into(),
        "--template".into(),
        id.into(),
        "--store".into(),
        store.into(),
    ];
    if let Some(key) = key {
        args.push("--signing-key".into());
        args.push(key.to_str().unwrap().into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run(&args);
    (ok, format!("{out}{err}"))
}

/// The export's bytes, read with nbdcopy; `Err` with nbdcopy's message when refused.
fn copy_export(node: &DaemonProc, export: &str, to: &Path) -> Result<Vec<u8>, String> {
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri(export), to.to_str().unwrap()]);
    if ok {
        Ok(std::fs::read(to).unwrap())
    } else {
        Err(err)
    }
}

/// `lazyblk status ID`: (success, stdout and stderr).
fn status(node: &DaemonProc, id: &str) -> (bool, String) {
    let (ok, out, err) = run(&["status", id, "--node", &node.url()]);
    (ok, format!("{out}{err}"))
}

/// The `last_error` of `id` in the node's `status --json` listing.
fn listed_error(node: &DaemonProc, id: &str) -> String {
    let (ok, out, err) = run(&["status", "--json", "--node", &node.url()]);
    assert!(ok, "status: {err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["template"] == id)
        .and_then(|r| r["last_error"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn hup(pid: u32) {
    let (ok, _, err) = sh("kill", &["-HUP", &pid.to_string()]);
    assert!(ok, "kill -HUP: {err}");
}

struct Keys {
    release: PathBuf,
    release_pub: String,
    other: PathBuf,
}

fn keys(dir: &Path) -> Keys {
    let release = dir.join("release.pem");
    let release_pub = keygen(&release);
    let other = dir.join("other.pem");
    openssl_key(&other);
    Keys {
        release,
        release_pub,
        other,
    }
}

#[test]
fn a_fleet_with_trusted_keys_serves_only_what_trusted_keys_signed() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let (cache_a, cache_b) = (dir.path().join("a"), dir.path().join("b"));
    let trusted = dir.path().join("trusted-keys");
    std::fs::write(
        &trusted,
        format!(
            "# release pipeline\n{} release\n{} node a\n{} node b\n",
            k.release_pub,
            node_key(&cache_a),
            node_key(&cache_b)
        ),
    )
    .unwrap();
    let image = make_ext4(dir.path(), 8, &[("app.bin", pattern(3 << 20, 1))]);
    let image_bytes = std::fs::read(&image).unwrap();

    // A store that takes anything, so the daemons are the ones that refuse.
    let store = StoreProc::start();
    let url = store.url();
    for (id, key) in [
        ("signed", Some(k.release.as_path())),
        ("unsigned", None),
        ("by-other", Some(k.other.as_path())),
    ] {
        let (ok, out) = publish(&url, &image, id, key);
        assert!(ok, "publish {id}: {out}");
    }
    assert!(store.root().join("manifests/signed.sig").exists());
    assert!(!store.root().join("manifests/unsigned.sig").exists());

    let flag = ["--trusted-keys", trusted.to_str().unwrap()];
    let a = DaemonProc::start_member(&url, &cache_a, &flag);
    let b = DaemonProc::start_member(&url, &cache_b, &flag);
    for (name, node) in [("a", &a), ("b", &b)] {
        let got = copy_export(node, "signed", &dir.path().join(format!("{name}-signed")));
        assert!(
            got.unwrap() == image_bytes,
            "node {name}: signed bytes differ"
        );
        for id in ["unsigned", "by-other"] {
            let refused = copy_export(node, id, &dir.path().join(format!("{name}-{id}")));
            assert!(refused.is_err(), "node {name} served {id}");
            let (ok, out) = status(node, id);
            assert!(!ok, "node {name}: status of {id} succeeded: {out}");
            assert!(out.contains(id), "node {name}: {out}");
        }
        let (_, out) = status(node, "unsigned");
        assert!(out.contains("not signed"), "node {name}: {out}");
        let (_, out) = status(node, "by-other");
        assert!(
            out.contains("signed by key") && out.contains("not in"),
            "node {name}: {out}"
        );
        assert!(
            listed_error(node, "by-other").contains("not in"),
            "node {name}"
        );
        assert!(listed_error(node, "signed").is_empty(), "node {name}");
    }

    // The template center hears of the refusals from both nodes' heartbeats.
    wait_until("both nodes to report by-other refused", || {
        let (ok, out, _) = run(&["status", "by-other", "--fleet", "--store", &url, "--json"]);
        let lines: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let refused = lines.as_array().map_or(0, |l| {
            l.iter()
                .filter(|l| l["last_error"].as_str().unwrap_or("").contains("not in"))
                .count()
        });
        ok && refused == 2
    });

    // A commit on node a is signed with a's key, which b trusts: b serves it.
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "signed",
        "--sandbox",
        "sb",
        "--node",
        &a.url(),
    ]);
    assert!(ok, "overlay create: {out}{err}");
    let changed = make_ext4(dir.path(), 8, &[("app.bin", pattern(3 << 20, 2))]);
    let (ok, _, err) = sh(
        "nbdcopy",
        &["--flush", changed.to_str().unwrap(), &a.nbd_uri("sb")],
    );
    assert!(ok, "nbdcopy into the sandbox: {err}");
    let (ok, out, err) = run(&["commit", "sb", "--template", "child", "--node", &a.url()]);
    assert!(ok, "commit: {out}{err}");
    assert!(store.root().join("manifests/child.sig").exists());
    let got = copy_export(&b, "child", &dir.path().join("b-child")).expect("b serves the commit");
    assert!(
        got == std::fs::read(&changed).unwrap(),
        "the commit's bytes differ"
    );

    // A store with --trusted-keys publishes only what a trusted key signed.
    let strict = StoreProc::start_with(&["--trusted-keys", trusted.to_str().unwrap()]);
    let (ok, out) = publish(&strict.url(), &image, "t-unsigned", None);
    assert!(!ok && out.contains("not signed"), "{out}");
    let (ok, out) = publish(&strict.url(), &image, "t-other", Some(&k.other));
    assert!(!ok && out.contains("signed by key"), "{out}");
    let (ok, out) = publish(&strict.url(), &image, "t-signed", Some(&k.release));
    assert!(ok, "{out}");
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/motd"), "signed build\n").unwrap();
    let (ok, out, err) = run(&[
        "build",
        "--from-dir",
        root.to_str().unwrap(),
        "--template",
        "t-built",
        "--store",
        &strict.url(),
        "--signing-key",
        k.release.to_str().unwrap(),
    ]);
    assert!(ok, "build --signing-key: {out}{err}");
    let (ok, out, _) = run(&["templates", "--store", &strict.url()]);
    assert!(
        ok && out.contains("t-signed") && out.contains("t-built"),
        "{out}"
    );
    assert!(
        !out.contains("t-unsigned") && !out.contains("t-other"),
        "{out}"
    );
}

/// A signed publish's manifest and signature in the store's directory.
fn stored(store: &StoreProc, id: &str) -> (Vec<u8>, Value) {
    let dir = store.root().join("manifests");
    let manifest = std::fs::read(dir.join(format!("{id}.json"))).unwrap();
    let sig = std::fs::read(dir.join(format!("{id}.sig"))).unwrap();
    (manifest, serde_json::from_slice(&sig).unwrap())
}

/// `curl -X PUT` of a manifest with signature headers: (HTTP status, body).
fn put_manifest(store: &StoreProc, id: &str, manifest: &Path, key: &str, sig: &str) -> String {
    let (_, out, err) = sh(
        "curl",
        &[
            "-s",
            "-w",
            "\n%{http_code}",
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "-H",
            &format!("x-lazyblk-manifest-key: {key}"),
            "-H",
            &format!("x-lazyblk-manifest-signature: {sig}"),
            "--data-binary",
            &format!("@{}", manifest.display()),
            &format!("{}/v1/templates/{id}/manifest", store.url()),
        ],
    );
    format!("{out}{err}")
}

#[test]
fn bad_signatures_are_refused_and_a_revoked_key_stops_serving() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let trusted = dir.path().join("trusted-keys");
    std::fs::write(&trusted, format!("{}\n", k.release_pub)).unwrap();
    let image = make_ext4(dir.path(), 8, &[("a", pattern(1 << 20, 3))]);
    let store = StoreProc::start();
    for id in ["good", "swapped", "short"] {
        let (ok, out) = publish(&store.url(), &image, id, Some(&k.release));
        assert!(ok, "{out}");
    }
    // A --signing-key that is not a private key: refused before anything is uploaded.
    let (ok, out) = publish(&store.url(), &image, "no-key", Some(&trusted));
    assert!(!ok && out.contains("not an ed25519 private key"), "{out}");
    assert!(!store.root().join("manifests/no-key.json").exists());
    // "swapped" keeps a real signature by the trusted key, of other bytes (good's);
    // "short" a signature cut in half.
    let (_, good_sig) = stored(&store, "good");
    let sig_dir = store.root().join("manifests");
    std::fs::write(sig_dir.join("swapped.sig"), good_sig.to_string()).unwrap();
    let (_, mut short) = stored(&store, "short");
    let half = short["signature"].as_str().unwrap()[..64].to_string();
    short["signature"] = Value::String(half.clone());
    std::fs::write(sig_dir.join("short.sig"), short.to_string()).unwrap();

    let node = DaemonProc::start(
        &store.url(),
        &dir.path().join("cache"),
        &["--trusted-keys", trusted.to_str().unwrap()],
    );
    assert!(copy_export(&node, "good", &dir.path().join("good")).is_ok());
    let (ok, out) = status(&node, "swapped");
    assert!(!ok && out.contains("does not match the manifest"), "{out}");
    let (ok, out) = status(&node, "short");
    assert!(!ok && out.contains("malformed"), "{out}");
    for id in ["swapped", "short"] {
        assert!(
            copy_export(&node, id, &dir.path().join(id)).is_err(),
            "{id} served"
        );
    }

    // A store with --trusted-keys refuses the same: a signature of other bytes, a cut
    // one; nothing is published.
    let strict = StoreProc::start_with(&["--trusted-keys", trusted.to_str().unwrap()]);
    let (manifest, _) = stored(&store, "swapped");
    let body = dir.path().join("swapped.json");
    std::fs::write(&body, &manifest).unwrap();
    let key = good_sig["key"].as_str().unwrap();
    let answer = put_manifest(
        &strict,
        "swapped",
        &body,
        key,
        good_sig["signature"].as_str().unwrap(),
    );
    assert!(
        answer.ends_with("403") && answer.contains("does not match"),
        "{answer}"
    );
    let answer = put_manifest(&strict, "swapped", &body, key, &half);
    assert!(
        answer.ends_with("400") && answer.contains("malformed"),
        "{answer}"
    );
    let (ok, out, _) = run(&["templates", "--store", &strict.url()]);
    assert!(ok && !out.contains("swapped"), "{out}");

    // The key revoked (removed from the file, SIGHUP): the node stops serving what it
    // signed, and the store stops publishing it.
    std::fs::write(&trusted, "# release key revoked\n").unwrap();
    hup(node.pid());
    wait_until("the node to refuse the revoked key", || {
        status(&node, "good").1.contains("not in")
    });
    assert!(copy_export(&node, "good", &dir.path().join("good-2")).is_err());
    assert!(listed_error(&node, "good").contains(&k.release_pub));
    // Trusted again and restarted: the copies the node kept are checked as they are
    // read back (the good one served, the swapped one still refused).
    std::fs::write(&trusted, format!("{}\n", k.release_pub)).unwrap();
    let mut node = node;
    node.restart();
    assert!(copy_export(&node, "good", &dir.path().join("good-3")).is_ok());
    let (ok, out) = status(&node, "swapped");
    assert!(!ok && out.contains("does not match the manifest"), "{out}");
    std::fs::write(&trusted, "# release key revoked\n").unwrap();

    let (ok, out) = publish(&strict.url(), &image, "before-hup", Some(&k.release));
    assert!(ok, "{out}");
    hup(strict.pid());
    wait_until("the store to refuse the revoked key", || {
        !publish(&strict.url(), &image, "after-hup", Some(&k.release)).0
    });
}
