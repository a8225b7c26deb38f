//! Issue 11: a daemon on an Azure Blob container (`az://...&emulator=true`), read
//! directly with no store process, against Azurite on 127.0.0.1 (from the npm
//! registry, installed by scripts/azurite.sh). Skipped, saying why, when Azurite cannot
//! be installed.

mod support;

use std::process::Stdio;

use support::buckets::Azurite;
use support::node::sh;
use support::{free_port, lazyblk, make_ext4, pattern, wait_http};

#[test]
fn a_daemon_reads_an_azure_container_directly() {
    let Some(azurite) = Azurite::start("templates") else {
        eprintln!("skipping the Azure test: Azurite could not be installed or started (npm install azurite); see the output above");
        return;
    };
    let store = "az://templates/lazyblk?emulator=true";
    let tmp = tempfile::tempdir().unwrap();
    let image = make_ext4(tmp.path(), 16, &[("big", pattern(5 << 20, 51))]);
    let out = lazyblk()
        .args([
            "publish",
            image.to_str().unwrap(),
            "--template",
            "az",
            "--store",
            store,
        ])
        .env("AZURITE_BLOB_STORAGE_URL", &azurite.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish to Azurite: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let http = free_port();
    let cache = tmp.path().join("cache");
    let mut daemon = lazyblk()
        .args([
            "daemon",
            "--cache",
            cache.to_str().unwrap(),
            "--store",
            store,
        ])
        .args(["--listen", &format!("127.0.0.1:{http}")])
        .env("AZURITE_BLOB_STORAGE_URL", &azurite.url)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_http(&format!("http://127.0.0.1:{http}/healthz"));
    let copy = tmp.path().join("copy");
    let uri = format!("nbd+unix:///az?socket={}", cache.join("nbd.sock").display());
    let (ok, _, err) = sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(ok, "nbdcopy from a daemon on Azurite: {err}");
    assert!(std::fs::read(copy).unwrap() == std::fs::read(&image).unwrap());
}
