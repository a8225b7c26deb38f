//! Issue 23, findings 13 and 14, with the real binary and real clients (curl, the
//! lazyblk CLI): no token in any `--help`, man page or `--print-config`; strings from
//! leases, errors and labels never reach a terminal or the store's log with their
//! control characters; policy keys and labels follow one grammar with size limits; a
//! malformed `--peers` stops the daemon with a clear error.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::node::{sh, DaemonProc};
use support::{free_port, lazyblk, make_ext4, pattern, publish, run, StoreProc};

/// Token values no output may contain, one per variable the CLI reads.
const SECRETS: [(&str, &str); 6] = [
    ("LAZYBLK_WRITE_TOKEN", "write-5ecret-1c7e9a"),
    ("LAZYBLK_READ_TOKEN", "read-5ecret-4b20d1"),
    ("LAZYBLK_PEER_TOKEN", "peer-5ecret-93f6e2"),
    ("LAZYBLK_MEMBER_TOKEN", "member-5ecret-7d1a0c"),
    ("LAZYBLK_ADMIN_TOKEN", "admin-5ecret-2e8b44"),
    ("LAZYBLK_REGISTRY_AUTH", "registry-user:5ecret-6f0c3a"),
];

/// Runs the binary with every token variable set: (success, stdout + stderr).
fn run_with_secrets(args: &[&str]) -> (bool, String) {
    let mut cmd = lazyblk();
    for (name, value) in SECRETS {
        cmd.env(name, value);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running lazyblk");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_no_secret(what: &str, text: &str) {
    for (name, value) in SECRETS {
        assert!(
            !text.contains(value),
            "{what} shows the value of {name}:\n{text}"
        );
    }
}

/// The subcommand names a `--help` page lists under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every command path of the CLI (`["daemon"]`, `["policy", "set"]`, ...), found by
/// walking the `--help` pages from the top.
fn every_command() -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let (ok, out, err) = run(&args);
        assert!(ok, "lazyblk {}: {out}{err}", args.join(" "));
        for name in subcommands(&out) {
            let mut sub = path.clone();
            sub.push(name);
            todo.push(sub.clone());
            found.push(sub);
        }
    }
    found
}

#[test]
fn no_help_page_man_page_or_printed_config_shows_a_token() {
    let commands = every_command();
    // The top level lists 20-odd commands; policy and overlay have their own.
    assert!(commands.len() >= 25, "{commands:?}");
    for flags in [vec!["--help"], vec!["-h"]] {
        let (ok, text) = run_with_secrets(&flags);
        assert!(ok, "{text}");
        assert_no_secret(&format!("lazyblk {}", flags.join(" ")), &text);
        for path in &commands {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.extend(&flags);
            let (ok, text) = run_with_secrets(&args);
            assert!(ok, "lazyblk {}: {text}", args.join(" "));
            assert_no_secret(&format!("lazyblk {}", args.join(" ")), &text);
        }
    }
    // `lazyblk help daemon` is the same page by another door.
    for path in &commands {
        let mut args = vec!["help"];
        args.extend(path.iter().map(String::as_str));
        let (ok, text) = run_with_secrets(&args);
        assert!(ok, "lazyblk {}: {text}", args.join(" "));
        assert_no_secret(&format!("lazyblk {}", args.join(" ")), &text);
    }
    // The man pages are made from the same arguments.
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man");
    let (ok, text) = run_with_secrets(&["manpages", pages.to_str().unwrap()]);
    assert!(ok, "{text}");
    let mut read = 0;
    for entry in std::fs::read_dir(&pages).unwrap() {
        let path = entry.unwrap().path();
        let page = std::fs::read_to_string(&path).unwrap();
        assert_no_secret(&path.display().to_string(), &page);
        read += 1;
    }
    assert!(read >= 20, "{read} man pages");
    // A config file that does not parse is refused without quoting its line (an
    // unquoted token there was printed in the parser's message).
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!("cache = \"/x\"\nwrite-token = {}\n", SECRETS[0].1),
    )
    .unwrap();
    let (ok, text) = run_with_secrets(&["daemon", "--config", config.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(text.contains("line 2"), "{text}");
    assert_no_secret("a config file's parse error", &text);
    // --print-config names where each token came from, never its value.
    for command in ["daemon", "store"] {
        let (ok, text) = run_with_secrets(&[command, "--print-config"]);
        assert!(ok, "{text}");
        assert!(text.contains("token = (hidden)"), "{text}");
        assert_no_secret(&format!("lazyblk {command} --print-config"), &text);
    }
}

/// A control character, DEL, or a C1 control: what must not reach a terminal.
fn control(c: char) -> bool {
    c != '\n' && c.is_control()
}

fn assert_printable(what: &str, text: &str) {
    if let Some(c) = text.chars().find(|c| control(*c)) {
        panic!("{what} printed the control character {c:?}:\n{text:?}");
    }
}

/// A node's lease, as a heartbeat sends it, carrying escape sequences, a carriage return
/// and newlines in every string a person sees.
fn hostile_heartbeat(template: &str) -> String {
    serde_json::json!({
        // The store takes only bare origins as addresses (tests/membership.rs).
        "url": "http://127.0.0.1:9",
        "version": "1.0\u{1b}[31m",
        "replicas": [{
            "template": template,
            "phase": "READY\u{1b}[5m",
            "local_chunks": 1,
            "stored_chunks": 1,
            "last_error": "boom\r\nWARN forged \u{9b}31m",
            "users": ["export sb\u{1b}[8m"],
        }],
        "cache_used_bytes": 0,
    })
    .to_string()
}

/// Renews the hostile lease, signed with a key of its own, as anyone who can reach the
/// store can; the node's id.
fn renew_hostile_lease(store: &str, template: &str) -> String {
    let key = support::lease::key(66);
    let id = support::lease::id_of(&key);
    let body: serde_json::Value = serde_json::from_str(&hostile_heartbeat(template)).unwrap();
    let (status, answer) = support::lease::heartbeat(store, &key, &id, &body, &[]);
    assert_eq!(status, 200, "PUT /v1/nodes/{id}: {answer}");
    id
}

/// A child process killed when dropped (a failed assertion must not leave it running).
struct Killed(std::process::Child);

impl Killed {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn strings_from_leases_never_reach_a_terminal_or_the_log_raw() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let root = dir.path().join("store");
    let log_path = dir.path().join("store.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let store = lazyblk()
        .args(["store", "--root", root.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("LAZYBLK_LOG", "info")
        .env_remove("LAZYBLK_WRITE_TOKEN")
        .env_remove("LAZYBLK_READ_TOKEN")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut store = Killed(store);
    let url = format!("http://127.0.0.1:{port}");
    support::wait_http(&format!("{url}/healthz"));
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 3))]);
    publish(&url, &image, "t");

    // Each command renews the lease first: a slow machine must not let it expire.
    let evil = renew_hostile_lease(&url, "t");
    let (ok, out, err) = run(&["nodes", "--store", &url]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&evil), "{out}");
    assert_printable("lazyblk nodes", &format!("{out}{err}"));
    // The hostile bytes are shown escaped, not dropped: an operator sees something odd.
    assert!(out.contains("\\u{1b}"), "{out}");

    renew_hostile_lease(&url, "t");
    let (ok, out, err) = run(&["status", "t", "--fleet", "--store", &url]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&evil), "{out}");
    assert_printable("lazyblk status t --fleet", &format!("{out}{err}"));

    renew_hostile_lease(&url, "t");
    let (ok, out, err) = run(&["delete", "t", "--store", &url]);
    assert!(!ok, "a template in use was deleted: {out}{err}");
    assert!(err.contains("in use"), "{err}");
    assert_printable("lazyblk delete", &format!("{out}{err}"));

    store.stop();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("node joined"), "{log}");
    assert_printable("the store's log", &log);
    assert!(
        !log.lines().any(|l| l.starts_with("INFO forged")),
        "a lease forged a log line:\n{log}"
    );
}

/// `curl -X PUT {store}/v1/policy/{key}` with `body`: the HTTP status.
fn put_policy(store: &str, key: &str, body: &str) -> u16 {
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
            &format!("{store}/v1/policy/{key}"),
        ],
    );
    assert!(ok, "curl: {out}{err}");
    out.trim().parse().unwrap_or(0)
}

#[test]
fn policy_keys_and_values_are_checked() {
    let store = StoreProc::start();
    let url = store.url();
    let minimum = r#"{"minimum":">=1.2"}"#;
    // A newline in a key, a 10 KB key, a 100 KB minimum: each refused with 400.
    assert_eq!(put_policy(&url, "bad%0Akey", minimum), 400);
    assert_eq!(put_policy(&url, "bad%1B%5B2Jkey", minimum), 400);
    assert_eq!(put_policy(&url, &"k".repeat(10_000), minimum), 400);
    let huge = format!(r#"{{"minimum":">={}"}}"#, "1.".repeat(50_000) + "1");
    assert_eq!(put_policy(&url, "guest_agent", &huge), 400);
    // The CLI refuses a bad key itself, with the grammar in its message.
    let (ok, out, err) = run(&["policy", "set", "bad key", ">=1", "--store", &url]);
    assert!(!ok, "{out}{err}");
    assert!(err.contains("label key"), "{err}");
    // What is valid still works, and `policy list` shows one line per rule.
    assert_eq!(put_policy(&url, "org.example%2Fguest_agent", minimum), 200);
    let (ok, out, err) = run(&["policy", "set", "guest_agent", ">=1.4.2", "--store", &url]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(&["policy", "list", "--store", &url]);
    assert!(ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["guest_agent >=1.4.2", "org.example/guest_agent >=1.2"],
        "{out}"
    );
}

#[test]
fn labels_are_checked_where_they_enter() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let url = store.url();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 5))]);
    let path = image.to_str().unwrap();
    let long_key = format!("{}=1", "k".repeat(10_000));
    let long_value = format!("team={}", "v".repeat(100_000));
    for label in [
        "bad key=1",
        "bad\nkey=1",
        "-dash=1",
        long_key.as_str(),
        long_value.as_str(),
        "team=a\u{1b}[2Jb",
    ] {
        let flag = format!("--label={label}");
        let (ok, out, err) = run(&[
            "publish",
            path,
            "--template",
            "labelled",
            "--store",
            &url,
            &flag,
        ]);
        assert!(!ok, "--label {label:?} was accepted: {out}");
        assert!(err.contains("label"), "{err}");
    }
    // Nothing was published by the refused commands.
    let (status, _) = support::http_get(&format!("{url}/v1/templates/labelled/manifest")).unwrap();
    assert_eq!(status, 404);

    // The store refuses a manifest with a bad label whoever sends it.
    publish(&url, &image, "good");
    let mut manifest = support::manifest_json(&url, "good");
    manifest["template"] = "forged".into();
    manifest["labels"] = serde_json::json!({ "x\u{1b}[2J": "1" });
    let file = dir.path().join("forged.json");
    std::fs::write(&file, manifest.to_string()).unwrap();
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{url}/v1/templates/forged/manifest"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.trim_end().ends_with("400"), "{out}");
    assert!(out.contains("label"), "{out}");

    // A commit through a daemon's API is refused before any work (400, not the store's
    // refusal at publish), and nothing is published.
    let node = DaemonProc::start(&url, &dir.path().join("node"), &[]);
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "good",
        "--sandbox",
        "sb",
        "--node",
        &node.url(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            r#"{"template":"committed","labels":{"bad key":"1"}}"#,
            &format!("{}/v1/overlays/sb/commit", node.url()),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.trim_end().ends_with("400"), "{out}");
    assert!(out.contains("label"), "{out}");
    let (status, _) = support::http_get(&format!("{url}/v1/templates/committed/manifest")).unwrap();
    assert_eq!(status, 404);
}

/// Starts a daemon with `--peers spec`; it must exit with an error naming `--peers`
/// (before: `dns::80` started a daemon that resolved an empty name for ever).
fn refused_peers(dir: &Path, spec: &str) -> String {
    let mut child = lazyblk()
        .args(["daemon", "--cache", dir.join("cache").to_str().unwrap()])
        .args(["--store", &format!("http://127.0.0.1:{}", free_port())])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--nbd", &format!("127.0.0.1:{}", free_port())])
        .args(["--peers", spec])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + support::START_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("--peers {spec:?}: the daemon started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "--peers {spec:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_malformed_peers_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for spec in [
        "dns::80",
        "dns:lazyblk.svc:",
        "dns:lazyblk.svc:0",
        "dns:bad name:7071",
        "http://",
        "http://:7071",
        "http://a b:7071",
    ] {
        let err = refused_peers(dir.path(), spec);
        assert!(err.contains("--peers"), "--peers {spec:?}: {err}");
    }
}
