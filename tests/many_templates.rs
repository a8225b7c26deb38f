//! A node that knows many templates keeps only a bounded number of idle replicas in
//! memory (their manifests stay on disk), and still lists and serves every one: over
//! NBD (nbdinfo --list, nbdsh), the FUSE mount and the status API.

mod support;

use std::time::{Duration, Instant};

use support::node::{nbdsh, sh, DaemonProc};
use support::{make_ext4, pattern, publish, StoreProc};

/// More than the daemon keeps idle in memory (256).
const TEMPLATES: usize = 300;

#[test]
fn idle_replicas_are_dropped_from_memory_and_read_again_when_used() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(tmp.path(), 8, &[("data", pattern(1 << 20, 5))]);
    publish(&store.url(), &image, "base");
    let (status, base) =
        support::http_get(&format!("{}/v1/templates/base/manifest", store.url())).unwrap();
    assert_eq!(status, 200);
    // Children that share the base's chunks, published as manifests.
    let mut base: serde_json::Value = serde_json::from_str(&base).unwrap();
    let dir = tmp.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..TEMPLATES {
        let id = format!("task-{i:03}");
        base["template"] = id.clone().into();
        base["parent"] = "base".into();
        std::fs::write(dir.join(&id), base.to_string()).unwrap();
    }
    let put = format!(
        "cd {} && ls | xargs -P 4 -I{{}} curl -sf -X PUT --data-binary @{{}} -o /dev/null {}/v1/templates/{{}}/manifest",
        dir.display(),
        store.url()
    );
    let (ok, _, err) = sh("sh", &["-c", &put]);
    assert!(ok, "putting manifests: {err}");

    let fuse = tmp.path().join("fuse");
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache"),
        &["--fuse", fuse.to_str().unwrap()],
    );
    // The daemon learns the store's templates in the background.
    let started = Instant::now();
    while daemon.metric("lazyblk_templates_known") < (TEMPLATES + 1) as f64 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the daemon learned {} templates",
            daemon.metric("lazyblk_templates_known")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let in_memory = daemon.metric("lazyblk_replicas_in_memory");
    assert!(
        in_memory <= 256.0,
        "{in_memory} replicas in memory for {} known",
        TEMPLATES + 1
    );

    // Every one is listed and served, whether in memory or not.
    let listed = std::fs::read_dir(fuse.join("templates")).unwrap().count();
    assert_eq!(listed, TEMPLATES + 1);
    let (ok, out, err) = sh("nbdinfo", &["--list", &daemon.nbd_uri("")]);
    assert!(ok, "nbdinfo --list: {err}");
    assert_eq!(out.matches("export=\"task-").count(), TEMPLATES);
    assert!(daemon.metric("lazyblk_replicas_in_memory") <= 256.0);
    let (status, body) = support::http_get(&format!("{}/v1/templates", daemon.url())).unwrap();
    assert_eq!(status, 200);
    let statuses: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(statuses.as_array().unwrap().len(), TEMPLATES + 1);

    // The first in id order is the first dropped; reading it brings it back.
    let bytes = std::fs::read(&image).unwrap();
    let script = "import sys; sys.stdout.write(h.pread(4096, 0).hex())";
    let (ok, out, err) = nbdsh(&daemon.nbd_uri("task-000"), script);
    assert!(ok, "nbdsh: {err}");
    let hex: String = bytes[..4096].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(out.trim(), hex);
    let (ok, _, err) = sh(
        "cmp",
        &[
            "-n",
            "4096",
            fuse.join("templates/task-001").to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    assert!(ok, "the FUSE file of a dropped replica: {err}");
}
