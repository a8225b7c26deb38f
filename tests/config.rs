//! Config files: `lazyblk daemon --config` and `lazyblk store --config` read every key
//! of the packaged files (`packaging/*.toml`, every flag listed), the command line wins
//! over the file, and a daemon and a store started from files alone serve.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::node::sh;
use support::{free_port, lazyblk, run, wait_http};

/// The packaged file with every commented setting turned on.
fn everything(packaged: &str) -> String {
    packaged
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                }) =>
            {
                rest.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `key = value` settings of a file (comments dropped), values as TOML parses them.
fn settings(text: &str) -> BTreeMap<String, toml::Value> {
    let table: toml::Table = text.parse().expect("a TOML file");
    table.into_iter().collect()
}

/// `--print-config` lines: key -> (value, source).
fn printed(out: &str) -> BTreeMap<String, (String, String)> {
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (kv, source) = l.rsplit_once("  # ")?;
            let (k, v) = kv.split_once(" = ")?;
            Some((k.to_string(), (v.to_string(), source.to_string())))
        })
        .collect()
}

/// Every setting of the packaged file but `omit` (flags that conflict) is read.
fn check_every_key(command: &str, packaged: &str, omit: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{command}.toml"));
    let text: String = everything(packaged)
        .lines()
        .filter(|l| !omit.iter().any(|k| l.starts_with(&format!("{k} = "))))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, &text).unwrap();
    let expected = settings(&text);
    let (ok, out, err) = run(&[
        command,
        "--config",
        path.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(ok, "{command} --print-config: {out}{err}");
    let got = printed(&out);
    for (key, value) in &expected {
        if key.ends_with("token") {
            // Tokens are never printed, and commented out so the output reads back.
            let line = format!("# {key} = (hidden)  # config file");
            assert!(out.lines().any(|l| l == line), "{command}: {key}:\n{out}");
            continue;
        }
        let (shown, source) = got
            .get(key)
            .unwrap_or_else(|| panic!("{command}: {key} is not in --print-config:\n{out}"));
        assert_eq!(source, "config file", "{command}: {key}: {out}");
        let want = match value {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        assert_eq!(shown.trim_matches('"'), want, "{command}: {key}: {out}");
    }
    // Nothing else came from the file (the unit test in src/cli/config.rs checks that the
    // packaged files name every flag).
    let from_file = got.values().filter(|(_, s)| s == "config file").count();
    let settings = expected.keys().filter(|k| !k.ends_with("token")).count();
    assert_eq!(from_file, settings, "{command}:\n{out}");
}

#[test]
fn every_key_of_the_packaged_config_files_is_read() {
    // No token variables may leak in from the environment of the test run.
    for var in [
        "LAZYBLK_READ_TOKEN",
        "LAZYBLK_WRITE_TOKEN",
        "LAZYBLK_PEER_TOKEN",
    ] {
        assert!(std::env::var_os(var).is_none(), "{var} is set");
    }
    check_every_key("daemon", include_str!("../packaging/daemon.toml"), &[]);
    // --root and --backend exclude each other: each is read in a run of its own.
    let store = include_str!("../packaging/store.toml");
    check_every_key("store", store, &["backend"]);
    check_every_key("store", store, &["root"]);
}

#[test]
fn flags_and_the_environment_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1\"\nfill-concurrency = 3\nwrite-token = \"from-file\"\n",
    )
    .unwrap();
    let out = lazyblk()
        .args([
            "daemon",
            "--config",
            path.to_str().unwrap(),
            "--print-config",
        ])
        .args(["--listen", "127.0.0.1:2"])
        .env("LAZYBLK_WRITE_TOKEN", "from-env")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let got = printed(&out);
    assert_eq!(
        got["listen"],
        ("\"127.0.0.1:2\"".into(), "flag".into()),
        "{out}"
    );
    assert_eq!(
        got["fill-concurrency"],
        ("\"3\"".into(), "config file".into()),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l == "# write-token = (hidden)  # environment"),
        "{out}"
    );
    assert_eq!(got["cache"].1, "default", "{out}");

    // A flag that excludes a file's key wins over it: --backend over the file's root.
    let store = dir.path().join("s.toml");
    std::fs::write(&store, "root = \"/from/file\"\n").unwrap();
    let (ok, out, err) = run(&[
        "store",
        "--config",
        store.to_str().unwrap(),
        "--backend",
        "s3://b/p?endpoint=http://127.0.0.1:1",
        "--print-config",
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(printed(&out)["backend"].1, "flag", "{out}");
    assert_eq!(printed(&out)["root"].1, "default", "{out}");
    // A global flag before the command wins over the file's.
    std::fs::write(&store, "log-format = \"json\"\n").unwrap();
    let (ok, out, err) = run(&[
        "--log-format",
        "text",
        "store",
        "--config",
        store.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        printed(&out)["log-format"],
        ("\"text\"".into(), "flag".into()),
        "{out}"
    );
}

#[test]
fn a_store_and_a_daemon_run_from_config_files_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (store_port, http_port) = (free_port(), free_port());
    let store_conf = dir.path().join("store.toml");
    std::fs::write(
        &store_conf,
        format!(
            "root = \"{}\"\nlisten = \"127.0.0.1:{store_port}\"\nlog-format = \"json\"\n",
            dir.path().join("store").display()
        ),
    )
    .unwrap();
    let daemon_conf = dir.path().join("daemon.toml");
    std::fs::write(
        &daemon_conf,
        format!(
            "cache = \"{}\"\nstore = \"http://127.0.0.1:{store_port}\"\nlisten = \"127.0.0.1:{http_port}\"\n",
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let mut store = lazyblk()
        .args(["store", "--config", store_conf.to_str().unwrap()])
        .env("LAZYBLK_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{store_port}/healthz"));
    let mut daemon = lazyblk()
        .args(["daemon", "--config", daemon_conf.to_str().unwrap()])
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{http_port}/healthz"));
    let image = support::make_ext4(dir.path(), 8, &[("hello", b"hi\n".to_vec())]);
    support::publish(&format!("http://127.0.0.1:{store_port}"), &image, "conf");
    let socket = dir.path().join("cache/nbd.sock");
    assert!(
        Path::new(&socket).exists(),
        "the NBD socket is under the file's cache"
    );
    let (ok, out, err) = sh(
        "nbdinfo",
        &[
            "--size",
            &format!("nbd+unix:///conf?socket={}", socket.display()),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), (8u64 << 20).to_string());
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = store.kill();
    let output = store.wait_with_output().unwrap();
    // log-format = "json" from the file: every log line is a JSON object.
    let logs = String::from_utf8_lossy(&output.stderr);
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "the store's log is not JSON: {first}"
    );
}
