//! Kernel block devices (`lazyblk attach` / `detach`, `/dev/nbdN`): the errors on a
//! host whose kernel has no nbd driver (this one), and, with `LAZYBLK_KERNEL_TEST=1`,
//! the real kernel client in a qemu guest (`scripts/kernel-test.sh`).

mod support;

use std::path::Path;
use std::process::Command;

use support::node::DaemonProc;
use support::{bin, http_get, make_ext4, run, StoreProc};

#[test]
fn attach_without_the_nbd_driver_says_so() {
    if Path::new("/sys/block/nbd0").exists() {
        eprintln!(
            "skipping: this kernel has the nbd driver (scripts/kernel-test.sh covers attach)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 16, &[("etc/hostname", b"t\n".to_vec())]);
    let image = image.to_str().expect("utf-8 path");
    let (ok, _, err) = run(&["publish", image, "--template", "t", "--store", &store.url()]);
    assert!(ok, "publish: {err}");
    let daemon = DaemonProc::start(&store.url(), &dir.path().join("cache"), &[]);
    let node = daemon.url();

    let (ok, out, err) = run(&["attach", "t", "--node", &node]);
    assert!(!ok, "attach succeeded without a driver: {out}");
    assert!(out.is_empty(), "attach printed a device: {out}");
    assert!(
        err.contains("the kernel has no nbd driver (modprobe nbd failed"),
        "{err}"
    );

    // Names are checked before the driver is looked for.
    let (ok, _, err) = run(&["attach", "t", "--device", "/dev/sda", "--node", &node]);
    assert!(
        !ok && err.contains("\"/dev/sda\" is not an NBD device"),
        "{err}"
    );
    let (ok, _, err) = run(&["attach", "No Such Name", "--node", &node]);
    assert!(!ok && err.contains("invalid export name"), "{err}");
    let (ok, _, err) = run(&["detach", "/dev/nbd0", "--node", &node]);
    assert!(
        !ok && err.contains("/dev/nbd0 is not attached by this daemon"),
        "{err}"
    );

    // Nothing is attached, and the template was never leased.
    assert_eq!(
        http_get(&format!("{node}/v1/attachments")).expect("listing attachments"),
        (200, "[]".to_string())
    );
    let (ok, out, err) = run(&["status", "t", "--json", "--node", &node]);
    assert!(ok, "status: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["users"], serde_json::json!([]), "{out}");

    // The devices' part of status: none, in words and as JSON.
    let (ok, out, err) = run(&["status", "--devices", "--node", &node]);
    assert!(ok, "status --devices: {err}");
    assert_eq!(out.trim(), "no kernel block devices attached by this node");
    let (ok, out, err) = run(&["status", "--devices", "--json", "--node", &node]);
    assert!(ok, "status --devices --json: {err}");
    let devices: serde_json::Value = serde_json::from_str(&out).expect("devices JSON");
    assert_eq!(devices, serde_json::json!([]));
    let (ok, out, _) = run(&["status", "--node", &node]);
    assert!(ok && !out.contains("DEVICE"), "{out}");
    let (ok, _, err) = run(&["status", "t", "--devices", "--node", &node]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

/// `attach --kind ublk` on a kernel outside the tested list (this host's, unless it is
/// a 6.12): refused at once with the kernel named and the NBD alternative, nothing
/// attached, nothing leased; a daemon told the kernel is fine (`--ublk-kernel`) goes on
/// to the driver check, which names the missing driver.
#[test]
fn attach_kind_ublk_is_refused_on_an_untested_kernel() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("kernel release")
        .trim()
        .to_string();
    if release.starts_with("6.12.") || Path::new("/dev/ublk-control").exists() {
        eprintln!("skipping: this kernel ({release}) is one ublk is offered on, or has ublk_drv");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 16, &[("etc/hostname", b"t\n".to_vec())]);
    let image = image.to_str().expect("utf-8 path");
    let (ok, _, err) = run(&["publish", image, "--template", "t", "--store", &store.url()]);
    assert!(ok, "publish: {err}");
    let daemon = DaemonProc::start(&store.url(), &dir.path().join("cache"), &[]);
    let node = daemon.url();

    let (ok, out, err) = run(&["attach", "t", "--kind", "ublk", "--node", &node]);
    assert!(!ok, "attach --kind ublk succeeded on {release}: {out}");
    assert!(out.is_empty(), "attach printed a device: {out}");
    assert!(
        err.contains(&format!("ublk is not offered on kernel {release}"))
            && err.contains("use --kind nbd")
            && err.contains("--ublk-kernel"),
        "{err}"
    );
    // The HTTP API's equivalent: 503 with the same words; an unknown kind is a 400.
    let post = |body: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-X", "POST", "-H"])
            .arg("content-type: application/json")
            .args(["-d", body, &format!("{node}/v1/attachments")])
            .output()
            .expect("running curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = post(r#"{"export": "t", "kind": "ublk"}"#);
    assert!(
        answer.ends_with("\n503") && answer.contains("use --kind nbd"),
        "{answer}"
    );
    let answer = post(r#"{"export": "t", "kind": "scsi"}"#);
    assert!(
        answer.ends_with("\n400") && answer.contains(r#"kind must be \"nbd\" or \"ublk\""#),
        "{answer}"
    );
    // The guard comes first, whatever device is named; detach knows ublk names.
    let (ok, _, err) = run(&[
        "attach",
        "t",
        "--kind",
        "ublk",
        "--device",
        "/dev/nbd0",
        "--node",
        &node,
    ]);
    assert!(!ok && err.contains("not offered on kernel"), "{err}");
    let (ok, _, err) = run(&["detach", "/dev/ublkb0", "--node", &node]);
    assert!(
        !ok && err.contains("/dev/ublkb0 is not attached by this daemon"),
        "{err}"
    );
    assert_eq!(
        http_get(&format!("{node}/v1/attachments")).expect("listing attachments"),
        (200, "[]".to_string())
    );
    let (ok, out, err) = run(&["status", "t", "--json", "--node", &node]);
    assert!(ok, "status: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["users"], serde_json::json!([]), "{out}");
    drop(daemon);

    // An operator who has tested this kernel adds it: the guard lets it through and
    // the driver check names what is missing.
    let daemon = DaemonProc::start(
        &store.url(),
        &dir.path().join("cache2"),
        &["--ublk-kernel", &release],
    );
    let node = daemon.url();
    let (ok, out, err) = run(&["attach", "t", "--kind", "ublk", "--node", &node]);
    assert!(!ok, "attach --kind ublk succeeded without ublk_drv: {out}");
    assert!(
        err.contains("no ublk driver") && err.contains("ublk_drv") && err.contains("--kind nbd"),
        "{err}"
    );
    assert_eq!(
        http_get(&format!("{node}/v1/attachments")).expect("listing attachments"),
        (200, "[]".to_string())
    );
}

/// The guest runs: the NBD checks on Debian 12's own kernel (6.1, no ublk), then the
/// ublk checks on its 6.12 (the kernel ublk is offered on), one after the other (two
/// guests at once would share this machine's two cores).
#[test]
fn attach_in_a_qemu_guest() {
    if std::env::var("LAZYBLK_KERNEL_TEST").as_deref() != Ok("1") {
        eprintln!(
            "skipping: set LAZYBLK_KERNEL_TEST=1 to boot a qemu guest whose kernel has the \
             nbd and ublk drivers and attach, mount and write through /dev/nbdN and \
             /dev/ublkbN (scripts/kernel-test.sh)"
        );
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kernel-test.sh");
    for (kind, kernel) in [
        ("nbd", "linux-image-cloud-amd64"),
        ("ublk", "linux-image-6.12-cloud-amd64"),
    ] {
        let status = Command::new(&script)
            .env("LAZYBLK_BIN", bin())
            .env("KERNEL_TEST_KIND", kind)
            .env("KERNEL_TEST_KERNEL", kernel)
            .status()
            .expect("running scripts/kernel-test.sh");
        assert!(
            status.success(),
            "scripts/kernel-test.sh with KERNEL_TEST_KIND={kind} on {kernel} failed ({status}); \
             the guest's console is in target/kernel-test/console.log"
        );
    }
}
