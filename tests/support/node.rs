//! A real `lazyblk daemon` process for integration tests: its own cache directory,
//! HTTP API on a free port, NBD on a free TCP port (or a unix socket).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::{free_port, lazyblk, metric, wait_http};

/// A daemon; killed (SIGKILL) on drop. The cache directory outlives restarts.
pub struct DaemonProc {
    child: Option<Child>,
    pub http_port: u16,
    pub nbd_port: u16,
    pub cache: PathBuf,
    store_url: String,
    extra: Vec<String>,
    unix: bool,
}

impl DaemonProc {
    /// A daemon over `store_url` with its cache in `cache` (created if missing).
    pub fn start(store_url: &str, cache: &Path, extra: &[&str]) -> DaemonProc {
        let mut d = DaemonProc {
            child: None,
            http_port: free_port(),
            nbd_port: free_port(),
            cache: cache.to_path_buf(),
            store_url: store_url.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            unix: false,
        };
        d.spawn();
        d
    }

    /// Like [`DaemonProc::start`], as a member of the store's fleet: `--advertise` is
    /// its own API URL, so it renews a lease and asks and serves peers.
    pub fn start_member(store_url: &str, cache: &Path, extra: &[&str]) -> DaemonProc {
        let mut d = DaemonProc {
            child: None,
            http_port: free_port(),
            nbd_port: free_port(),
            cache: cache.to_path_buf(),
            store_url: store_url.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            unix: false,
        };
        d.extra.push("--advertise".into());
        d.extra.push(d.url());
        d.spawn();
        d
    }

    /// Like [`DaemonProc::start`], serving NBD on a unix socket in the cache directory.
    pub fn start_unix(store_url: &str, cache: &Path, extra: &[&str]) -> DaemonProc {
        let mut d = DaemonProc {
            child: None,
            http_port: free_port(),
            nbd_port: 0,
            cache: cache.to_path_buf(),
            store_url: store_url.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            unix: true,
        };
        d.spawn();
        d
    }

    /// Like [`DaemonProc::start_unix`], as a member of the store's fleet (`--advertise`
    /// its own API URL): only then does it serve its chunks to other nodes, as the
    /// origin of its commits.
    pub fn start_unix_member(store_url: &str, cache: &Path, extra: &[&str]) -> DaemonProc {
        let mut d = DaemonProc {
            child: None,
            http_port: free_port(),
            nbd_port: 0,
            cache: cache.to_path_buf(),
            store_url: store_url.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            unix: true,
        };
        d.extra.push("--advertise".into());
        d.extra.push(d.url());
        d.spawn();
        d
    }

    fn socket(&self) -> PathBuf {
        self.cache.join("nbd.sock")
    }

    fn spawn(&mut self) {
        let nbd = if self.unix {
            format!("unix:{}", self.socket().display())
        } else {
            format!("127.0.0.1:{}", self.nbd_port)
        };
        let child = lazyblk()
            .arg("daemon")
            .arg("--cache")
            .arg(&self.cache)
            .args(["--store", &self.store_url])
            .args(["--listen", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--nbd", &nbd])
            .args(&self.extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting lazyblk daemon");
        self.child = Some(child);
        wait_http(&format!("{}/healthz", self.url()));
    }

    /// `http://127.0.0.1:PORT` of the API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The NBD URI of an export.
    pub fn nbd_uri(&self, export: &str) -> String {
        if self.unix {
            format!("nbd+unix:///{export}?socket={}", self.socket().display())
        } else {
            format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
        }
    }

    /// A daemon counter as printed on /metrics (name with labels).
    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.url(), name)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: the clean shutdown path.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix_kill(child.id(), 15);
            let _ = child.wait();
        }
    }

    /// Starts again with the same cache, ports and arguments.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

fn nix_kill(pid: u32, signal: i32) -> std::io::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command and returns (success, stdout, stderr).
pub fn sh(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd} (is it installed? scripts/setup.sh): {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// libnbd's `nbdsh`, run with the system Python that has the `nbd` module (a python3
/// earlier on PATH, e.g. pyenv's, lacks it).
pub fn nbdsh(uri: &str, script: &str) -> (bool, String, String) {
    sh("/usr/bin/python3", &["-m", "nbd", "-u", uri, "-c", script])
}
