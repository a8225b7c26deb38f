//! Issue 11: a daemon on an Azure Blob container (`az://...&emulator=true`), read
//! directly with no store process, against Azurite on 127.0.0.1 (from the npm
//! registry, installed by scripts/azurite.sh). Skipped, saying why, when Azurite cannot
//! be installed.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::node::sh;
use support::{free_port, lazyblk, make_ext4, pattern, wait_http};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/azurite.sh")
}

struct Azurite {
    dir: tempfile::TempDir,
    url: String,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn start_azurite(container: &str) -> Option<Azurite> {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(script())
        .arg("start")
        .arg(dir.path())
        .arg(container)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let url = line
        .trim()
        .strip_prefix("export AZURITE_BLOB_STORAGE_URL=")?
        .to_string();
    if !out.status.success() {
        return None;
    }
    Some(Azurite { dir, url })
}

#[test]
fn a_daemon_reads_an_azure_container_directly() {
    let Some(azurite) = start_azurite("templates") else {
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
