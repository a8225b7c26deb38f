//! `daemon --ublk-mount-namespace`: a daemon that moves into a private mount namespace
//! receives no mount made later where it was started (so a mount of one of its
//! devices can never make it the last holder of a namespace that needs it), and a
//! private namespace with a FUSE mount is refused at start. The ublk side (a device
//! mounted beside the daemon, then the daemon killed) runs in the kernel guest:
//! scripts/guest-ublk.sh.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{free_port, lazyblk, wait_for, wait_http, StoreProc};

/// Whether this process may make mount namespaces (root with CAP_SYS_ADMIN).
fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["-m", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts, in a new mount namespace whose mounts are shared (a container's, say), a
/// shell that starts the daemon with `mode`, waits for `dir/go`, mounts a tmpfs at
/// `dir/later` in that namespace, and says so in `dir/mounted`. Returns what the
/// daemon's `/proc/PID/mountinfo` shows of the tmpfs, whether its namespace differs
/// from the shell's.
fn later_mount_seen(mode: &str) -> (bool, bool) {
    let store = StoreProc::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cache = dir.path().join("cache");
    let script = format!(
        r#"set -e
"$LAZYBLK" daemon --cache '{cache}' --store '{store}' --listen 127.0.0.1:{port} \
  --nbd 'unix:{cache}/nbd.sock' --ublk-mount-namespace {mode} 2>'{dir}/daemon.log' &
echo $! >'{dir}/daemon.pid'
echo $$ >'{dir}/shell.pid'
while [ ! -e '{dir}/go' ]; do sleep 0.05; done
mkdir -p '{dir}/later'
mount -t tmpfs lazyblk-later '{dir}/later'
touch '{dir}/mounted'
wait"#,
        cache = cache.display(),
        store = store.url(),
        dir = dir.path().display(),
    );
    let mut shell = Command::new("unshare")
        .args(["-m", "--propagation", "shared", "--", "sh", "-c", &script])
        .env("LAZYBLK", support::bin())
        .spawn()
        .expect("unshare");
    wait_http(&format!("http://127.0.0.1:{port}/healthz"));
    let read_pid = |name: &str| -> u32 {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let daemon = read_pid("daemon.pid");
    let shell_pid = read_pid("shell.pid");
    std::fs::write(dir.path().join("go"), "").unwrap();
    let mounted = dir.path().join("mounted");
    wait_for("the shell's tmpfs", Duration::from_secs(20), || {
        mounted.exists()
    });
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let apart = ns(daemon) != ns(shell_pid);
    let table = std::fs::read_to_string(format!("/proc/{daemon}/mountinfo")).unwrap();
    let seen = table.contains("lazyblk-later");
    let _ = Command::new("kill")
        .args(["-9", &daemon.to_string()])
        .status();
    let _ = shell.wait();
    (seen, apart)
}

#[test]
fn a_private_namespace_receives_no_later_mount() {
    if !can_unshare() {
        eprintln!("skipped: this process cannot make mount namespaces");
        return;
    }
    let (seen, apart) = later_mount_seen("private");
    assert!(
        apart,
        "the daemon stayed in the namespace it was started in"
    );
    assert!(
        !seen,
        "a mount made after the start reached the daemon's namespace"
    );
    // The same daemon left where it was sees it: the check above can fail.
    let (seen, apart) = later_mount_seen("shared");
    assert!(!apart && seen, "shared: apart {apart}, seen {seen}");
}

#[test]
fn private_with_fuse_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = lazyblk()
        .args(["daemon", "--cache"])
        .arg(dir.path().join("cache"))
        .args(["--fuse"])
        .arg(dir.path().join("fuse"))
        .args(["--ublk-mount-namespace", "private"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ublk-mount-namespace private and --fuse"),
        "{err}"
    );
    assert!(!Path::new(&dir.path().join("cache"))
        .join("state.db")
        .exists());
}
