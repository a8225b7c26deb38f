//! Every client command that prints, run with `--json` against a real store and a real
//! daemon: the output parses and its fields are the servers' typed ones (names and
//! values a script relies on), and the flag rules of `src/commands/` hold: exit code 2
//! for usage, 1 for a failure; a token from a file; the old `--write-token` name still
//! accepted and not shown. A failure with `--json` prints `{"error", "status"}` on
//! stdout: a refused attach and detach are checked here on any host; their successful
//! JSON needs a kernel NBD device (scripts/guest-lib.sh, in the kernel test's guest).

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::DaemonProc;
use support::{lazyblk, make_ext4, pattern, run, StoreProc};

/// How long the fleet gets to report a change (a heartbeat is every 2 s): generous for
/// a loaded machine; waits end as soon as the change is seen.
const SETTLE: Duration = Duration::from_secs(60);

/// Runs the binary, asserts success, parses stdout as JSON.
fn json(args: &[&str]) -> Value {
    let (ok, out, err) = run(args);
    assert!(ok, "lazyblk {}: {out}{err}", args.join(" "));
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("lazyblk {}: not JSON ({e}): {out}", args.join(" ")))
}

/// The field `key` of `v`, which must be present.
fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("no field {key:?} in {v:#}"))
}

fn u(v: &Value, key: &str) -> u64 {
    field(v, key)
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} is not a number in {v:#}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    field(v, key)
        .as_str()
        .unwrap_or_else(|| panic!("{key:?} is not a string in {v:#}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn every_printing_command_speaks_typed_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let store_url = store.url();
    let st = store_url.as_str();
    let image = make_ext4(dir.path(), 8, &[("data.bin", pattern(300_000, 7))]);

    // publish
    let published = json(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "base",
        "--store",
        st,
        "--json",
    ]);
    assert_eq!(s(&published, "template"), "base");
    assert_eq!(u(&published, "size"), 8 << 20);
    assert!(u(&published, "uploaded_chunks") > 0, "{published:#}");

    // templates
    let templates = json(&["templates", "--store", st, "--json"]);
    let base = &templates.as_array().unwrap()[0];
    assert_eq!(s(base, "template"), "base");
    assert_eq!(u(base, "size"), 8 << 20);
    assert_eq!(s(base, "durability"), "DURABLE");
    assert_eq!(u(base, "present_chunks"), u(base, "stored_chunks"));

    // resize runs e2fsck and resize2fs on the overlay's file: it needs a FUSE mount.
    let fuse = dir.path().join("fuse");
    let fuse_usable = std::path::Path::new("/dev/fuse").exists()
        && std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let extra: &[&str] = if fuse_usable {
        &["--fuse", fuse.to_str().unwrap()]
    } else {
        eprintln!("resize --json not checked: needs root and /dev/fuse");
        &[]
    };
    let node = DaemonProc::start_member(st, &dir.path().join("n1"), extra);
    let node_url = node.url();
    let nd = node_url.as_str();

    // warm, status
    let warmed = json(&["warm", "base", "--wait", "--node", nd, "--json"]);
    assert_eq!(s(&warmed, "phase"), "READY");
    assert_eq!(u(&warmed, "local_chunks"), u(&warmed, "stored_chunks"));
    assert_eq!(u(&warmed, "local_bytes"), u(&warmed, "stored_bytes"));
    let one = json(&["status", "base", "--node", nd, "--json"]);
    assert_eq!(s(&one, "template"), "base");
    assert_eq!(u(&one, "size"), 8 << 20);
    assert_eq!(u(&one, "chunk_size"), u(base, "chunk_size"));
    assert!(field(&one, "users").as_array().unwrap().is_empty());
    let all = json(&["status", "--node", nd, "--json"]);
    assert_eq!(s(&all[0], "phase"), "READY");
    let devices = json(&["status", "--devices", "--node", nd, "--json"]);
    assert_eq!(devices, Value::Array(vec![]));

    // overlay create / list, commit, resize, overlay delete
    let created = json(&[
        "overlay",
        "create",
        "base",
        "--sandbox",
        "sb1",
        "--node",
        nd,
        "--json",
    ]);
    assert_eq!(s(&created, "sandbox"), "sb1");
    assert_eq!(s(&created, "template"), "base");
    assert_eq!(u(&created, "size"), 8 << 20);
    assert_eq!(u(&created, "written_bytes"), 0);
    let (ok, human, err) = run(&[
        "overlay",
        "create",
        "base",
        "--sandbox",
        "sb2",
        "--node",
        nd,
    ]);
    assert!(ok, "{err}");
    assert!(
        human.starts_with("created overlay sb2 over base"),
        "{human}"
    );
    let listed = json(&["overlay", "list", "--node", nd, "--json"]);
    let sandboxes: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|o| s(o, "sandbox"))
        .collect();
    assert_eq!(sandboxes.len(), 2, "{listed:#}");
    assert!(sandboxes.contains(&"sb1") && sandboxes.contains(&"sb2"));
    let committed = json(&[
        "commit",
        "sb1",
        "--template",
        "child",
        "--label",
        "guest_agent=1.0",
        "--node",
        nd,
        "--json",
    ]);
    assert_eq!(s(&committed, "template"), "child");
    assert_eq!(s(&committed, "parent"), "base");
    assert_eq!(s(&committed, "sandbox"), "sb1");
    assert_eq!(u(&committed, "new_chunks"), 0, "nothing was written");
    assert!(["ORIGIN_ONLY", "UPLOADING", "DURABLE"].contains(&s(&committed, "durability")));
    let resized = json(&[
        "resize",
        "base",
        "--size",
        "16M",
        "--template",
        "big",
        "--node",
        nd,
        "--json",
    ]);
    assert_eq!(s(&resized, "template"), "big");
    assert_eq!(u(&resized, "old_size"), 8 << 20);
    assert_eq!(u(&resized, "new_size"), 16 << 20);
    assert_eq!(s(field(&resized, "commit"), "parent"), "base");
    for sb in ["sb1", "sb2"] {
        let deleted = json(&["overlay", "delete", sb, "--node", nd, "--json"]);
        assert_eq!(s(&deleted, "sandbox"), sb);
        assert_eq!(field(&deleted, "deleted"), true);
    }

    // evict, scrub (node and store)
    let evicted = json(&["evict", "base", "--node", nd, "--json"]);
    assert_eq!(s(&evicted, "template"), "base");
    assert!(u(&evicted, "removed_chunks") > 0, "{evicted:#}");
    assert!(s(&evicted, "phase")
        .chars()
        .all(|c| c.is_ascii_uppercase() || c == '_'));
    let scrubbed = json(&["scrub", "--node", nd, "--json"]);
    assert!(field(&scrubbed, "dropped").as_array().unwrap().is_empty());
    assert!(field(&scrubbed, "unreadable").as_array().is_some());
    let _ = u(&scrubbed, "checked");
    let store_scrub = json(&["scrub", "--store", st, "--json"]);
    assert!(u(&store_scrub, "checked") > 0, "{store_scrub:#}");
    assert!(field(&store_scrub, "dropped")
        .as_array()
        .unwrap()
        .is_empty());

    // the fleet: nodes, wishes, status --fleet, policy
    wait_for("the node's lease", || {
        let nodes = json(&["nodes", "--store", st, "--json"]);
        nodes.as_array().is_some_and(|n| n.len() == 1)
    });
    let nodes = json(&["nodes", "--store", st, "--json"]);
    let me = &nodes[0];
    assert_eq!(s(me, "url"), nd);
    assert!(!s(me, "id").is_empty() && !s(me, "version").is_empty());
    let wish = json(&["warm", "base", "--all-nodes", "--store", st, "--json"]);
    assert_eq!(s(&wish, "template"), "base");
    assert_eq!(field(&wish, "placement"), "all_nodes");
    let wish = json(&[
        "warm",
        "base",
        "--min-replicas",
        "1",
        "--store",
        st,
        "--json",
    ]);
    assert_eq!(u(field(&wish, "placement"), "min_replicas"), 1);
    let redo = json(&["warm", "base", "--failed", "--store", st, "--json"]);
    assert_eq!(u(&redo, "redo"), 1);
    wait_for("the fleet to want base on the node", || {
        let fleet = json(&["status", "base", "--fleet", "--store", st, "--json"]);
        fleet[0].get("wanted") == Some(&Value::Bool(true))
    });
    let fleet = json(&["status", "base", "--fleet", "--store", st, "--json"]);
    assert_eq!(s(&fleet[0], "node"), s(me, "id"));
    assert_eq!(s(&fleet[0], "url"), nd);
    let _ = (u(&fleet[0], "local_chunks"), u(&fleet[0], "stored_chunks"));
    let unwarmed = json(&["unwarm", "base", "--store", st, "--json"]);
    assert_eq!(s(&unwarmed, "template"), "base");
    assert_eq!(field(&unwarmed, "removed"), true);
    let again = json(&["unwarm", "base", "--store", st, "--json"]);
    assert_eq!(field(&again, "removed"), false);
    let policy = json(&[
        "policy",
        "set",
        "guest_agent",
        ">=2.0",
        "--store",
        st,
        "--json",
    ]);
    assert_eq!(s(&policy, "guest_agent"), ">=2.0");
    let policy = json(&["policy", "list", "--store", st, "--json"]);
    assert_eq!(s(&policy, "guest_agent"), ">=2.0");
    let stale = json(&["templates", "--stale", "--store", st, "--json"]);
    let stale: Vec<&str> = stale
        .as_array()
        .unwrap()
        .iter()
        .map(|t| s(t, "template"))
        .collect();
    assert!(
        stale.contains(&"child"),
        "child has guest_agent=1.0: {stale:?}"
    );
    let policy = json(&["policy", "unset", "guest_agent", "--store", st, "--json"]);
    assert_eq!(policy, serde_json::json!({}));

    // delete, gc
    let deleted = json(&["delete", "child", "--store", st, "--json"]);
    assert_eq!(s(&deleted, "template"), "child");
    assert_eq!(field(&deleted, "deleted"), true);
    let gc = json(&["gc", "--grace", "0s", "--store", st, "--json"]);
    assert!(u(&gc, "chunks_referenced") > 0, "{gc:#}");
    let _ = (u(&gc, "chunks_deleted"), u(&gc, "bytes_freed"));

    // keys
    let key_file = dir.path().join("signing.pem");
    let key = json(&["keygen", key_file.to_str().unwrap(), "--json"]);
    assert_eq!(s(&key, "file"), key_file.to_str().unwrap());
    assert_eq!(s(&key, "public_key").len(), 64, "{key:#}");
    let cache = dir.path().join("n1");
    let node_key = json(&["node-key", "--cache", cache.to_str().unwrap(), "--json"]);
    assert_eq!(s(&node_key, "node_id"), s(me, "id"));
}

/// Exit codes: 2 for a command line clap refuses (nothing sent), 1 for a failure.
#[test]
fn exit_codes_say_usage_or_failure() {
    let usage = lazyblk()
        .args(["status", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    let usage = lazyblk().args(["warm"]).output().unwrap();
    assert_eq!(
        usage.status.code(),
        Some(2),
        "a missing argument: {usage:?}"
    );
    // Nothing listens on the discard port of loopback.
    let failed = lazyblk()
        .args(["status", "--node", "http://127.0.0.1:9", "--json"])
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("unreachable"), "{err}");
    // With --json the failure is on stdout too, typed: no server answered.
    let failure = failure_of(&failed);
    assert!(s(&failure, "error").contains("unreachable"), "{failure:#}");
    assert_eq!(field(&failure, "status"), &Value::Null);
    // Without --json stdout stays empty: the reason is on stderr only.
    let failed = lazyblk()
        .args(["status", "--node", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        failed.stdout.is_empty(),
        "no output on a failure without --json"
    );
}

/// A failed `--json` command's stdout: `{"error", "status"}` and nothing else, the
/// same message as the `error:` line on stderr.
fn failure_of(out: &std::process::Output) -> Value {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failure: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("a failure's stdout is not JSON ({e}): {stdout}"));
    let keys: Vec<&str> = failure
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {failure:#}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["error", "status"], "{failure:#}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!("error: {}", s(&failure, "error")),
        "stderr and the JSON say the same"
    );
    failure
}

/// `attach` and `detach --json` refused by the daemon (or before anything is sent):
/// exit status 1 and the typed failure on stdout, with the daemon's status. Works on
/// any host: where the kernel has an NBD driver and the test runs as root, the attach
/// of a template succeeds instead, and its device is checked and detached.
#[test]
fn refused_attach_and_detach_print_typed_failures() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let st = store.url();
    let image = make_ext4(dir.path(), 4, &[("a", pattern(10_000, 3))]);
    let (ok, _, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "base",
        "--store",
        &st,
    ]);
    assert!(ok, "{err}");
    let node = DaemonProc::start(&st, &dir.path().join("n1"), &[]);
    let nd = node.url();
    let attempt = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--node", nd.as_str(), "--json"]);
        lazyblk().args(&all).output().unwrap()
    };

    // Refused by the daemon before any device is touched.
    let failure = failure_of(&attempt(&["attach", "base", "--connections", "99"]));
    assert_eq!(u(&failure, "status"), 400);
    assert!(
        s(&failure, "error").contains("--connections"),
        "{failure:#}"
    );
    let failure = failure_of(&attempt(&["detach", "/dev/nbd0"]));
    assert_eq!(u(&failure, "status"), 404);
    assert!(
        s(&failure, "error").contains("not attached by this daemon"),
        "{failure:#}"
    );
    // Refused by the client: nothing was sent.
    let failure = failure_of(&attempt(&["detach", "/dev/sda/1"]));
    assert_eq!(field(&failure, "status"), &Value::Null);
    assert!(
        s(&failure, "error").contains("not a kernel block device"),
        "{failure:#}"
    );

    // A real attach: refused where the kernel has no NBD driver (or this is not
    // root), else a device to check and detach.
    let out = attempt(&["attach", "base"]);
    if out.status.success() {
        let device: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s(&device, "export"), "base");
        assert_eq!(u(&device, "size"), 4 << 20);
        assert_eq!(field(&device, "read_only"), true);
        let path = s(&device, "device").to_string();
        let detached = json(&["detach", &path, "--node", &nd, "--json"]);
        assert_eq!(s(&detached, "device"), path);
        assert_eq!(s(&detached, "export"), "base");
    } else {
        let failure = failure_of(&out);
        let status = u(&failure, "status");
        assert!((400..600).contains(&status), "{failure:#}");
        assert!(!s(&failure, "error").is_empty(), "{failure:#}");
        eprintln!("attach refused here ({status}): {}", s(&failure, "error"));
    }
    // Nothing is left attached either way.
    let devices = json(&["status", "--devices", "--node", &nd, "--json"]);
    assert_eq!(devices, Value::Array(vec![]));
}

/// One name per secret: `--token`, its file, or the environment; `--write-token` is an
/// old hidden alias; the value is never shown.
#[test]
fn tokens_have_one_name_and_stay_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start_with(&["--write-token", "sesame"]);
    let st = store.url();
    let image = make_ext4(dir.path(), 4, &[("a", pattern(10_000, 1))]);
    let image = image.to_str().unwrap();
    let (ok, _, err) = run(&[
        "publish",
        image,
        "--template",
        "t1",
        "--store",
        &st,
        "--token",
        "sesame",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&[
        "publish",
        image,
        "--template",
        "t2",
        "--store",
        &st,
        "--token",
        "sesame",
    ]);
    assert!(ok, "{err}");

    let (ok, _, err) = run(&["delete", "t1", "--store", &st]);
    assert!(!ok, "a delete without the token is refused");
    assert!(!err.contains("sesame"), "{err}");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "sesame\n").unwrap();
    let deleted = json(&[
        "delete",
        "t1",
        "--store",
        &st,
        "--token-file",
        token_file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(field(&deleted, "deleted"), true);
    let deleted = json(&[
        "delete",
        "t2",
        "--store",
        &st,
        "--write-token",
        "sesame",
        "--json",
    ]);
    assert_eq!(field(&deleted, "deleted"), true);
    let gc = lazyblk()
        .args(["gc", "--grace", "0s", "--store", &st, "--json"])
        .env("LAZYBLK_WRITE_TOKEN", "sesame")
        .output()
        .unwrap();
    assert!(gc.status.success(), "{gc:?}");

    for command in ["delete", "gc", "unwarm", "scrub", "warm", "evict"] {
        let help = lazyblk()
            .args([command, "--help"])
            .env("LAZYBLK_WRITE_TOKEN", "sesame")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("--token <TOKEN>"), "{command}: {help}");
        assert!(help.contains("--token-file <PATH>"), "{command}: {help}");
        assert!(!help.contains("--write-token"), "{command}: {help}");
        assert!(!help.contains("sesame"), "{command}: {help}");
    }
}
