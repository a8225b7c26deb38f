//! Issue 24: one conformance suite, written once against the image traits
//! (`conformance/suite.rs`), drives the NBD and the FUSE frontends over the in-memory
//! image set and over the daemon's images: the same reads, writes, flushes, trims,
//! write-zeroes and data maps give the same answers through both doors (NBD through
//! libnbd, FUSE through pread/pwrite/fsync/fallocate/lseek on the mounted file), and
//! the answers hold the bytes a model of the script predicts.

#[path = "conformance/suite.rs"]
mod suite;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazyblk_image::{Kind, MemImages};
use lazyblk_nbd::{Listener, ServerConfig};
use suite::{
    assert_same, check_model, fuse_usable, read_only_script, script, FuseDoor, ImageDoor, NbdDoor,
};
use support::node::{sh, DaemonProc};
use support::{make_ext4, pattern, publish, run, StoreProc};

/// Size of the in-memory images: room for the script, with holes to find.
const MEM_SIZE: u64 = 8 << 20;

/// The in-memory images' first bytes: a pattern, with two zero ranges (holes) and an
/// unaligned zero run inside a block (data that reads as zeroes).
fn mem_start() -> Vec<u8> {
    let mut bytes = suite::data(MEM_SIZE, 77);
    bytes[512 << 10..1536 << 10].fill(0);
    bytes[5 << 20..6 << 20].fill(0);
    bytes[(7 << 20) + 100..(7 << 20) + 3000].fill(0);
    bytes
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nbd_and_fuse_give_the_same_answers_over_in_memory_images() {
    if !fuse_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let start = mem_start();
    let images = Arc::new(MemImages::new());
    for name in ["reference", "via-nbd", "via-fuse"] {
        images.insert(Kind::Sandbox, name, start.clone());
    }
    images.insert(Kind::Template, "template", start.clone());

    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(lazyblk_nbd::serve(
        Listener::Tcp(listener),
        images.clone(),
        ServerConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let dir = tmp.path().join("mnt");
    let mount = lazyblk_fuse::mount(
        &dir,
        images.clone(),
        runtime.handle().clone(),
        lazyblk_fuse::MountOptions::default(),
    )
    .unwrap();
    let nbd = |name: &str, scratch: &str| NbdDoor {
        uri: format!("nbd://127.0.0.1:{port}/{name}"),
        scratch: tmp.path().join(scratch),
    };

    let steps = script(MEM_SIZE);
    let reference = images.get("reference").unwrap();
    let by_traits = runtime.block_on(ImageDoor(&*reference).run(&steps));
    check_model(&start, &steps, &by_traits, true);
    let by_nbd = nbd("via-nbd", "nbd").run(&steps);
    let by_fuse = FuseDoor {
        path: dir.join("sandboxes/via-fuse"),
    }
    .run(&steps);
    assert_same(&steps, ("the traits", &by_traits), ("NBD", &by_nbd));
    assert_same(&steps, ("the traits", &by_traits), ("FUSE", &by_fuse));
    let want = reference.contents();
    assert!(
        images.get("via-nbd").unwrap().contents() == want,
        "NBD left other bytes"
    );
    assert!(
        images.get("via-fuse").unwrap().contents() == want,
        "FUSE left other bytes"
    );
    assert!(
        images.get("via-fuse").unwrap().flushes() >= 2,
        "fsync reached the image"
    );

    let steps = read_only_script(MEM_SIZE);
    let template = images.get("template").unwrap();
    let by_traits = runtime.block_on(ImageDoor(&*template).run(&steps));
    check_model(&start, &steps, &by_traits, false);
    let by_nbd = nbd("template", "nbd-template").run(&steps);
    let by_fuse = FuseDoor {
        path: dir.join("templates/template"),
    }
    .run(&steps);
    assert_same(&steps, ("the traits", &by_traits), ("NBD", &by_nbd));
    assert_same(&steps, ("the traits", &by_traits), ("FUSE", &by_fuse));
    assert!(template.contents() == start, "a read-only image changed");

    mount.unmount().unwrap();
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
}

fn create_overlay(daemon: &DaemonProc, template: &str, sandbox: &str) {
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        template,
        "--sandbox",
        sandbox,
        "--node",
        &daemon.url(),
    ]);
    assert!(ok, "overlay create: {out}{err}");
}

/// Every byte of an export, through nbdcopy.
fn nbd_bytes(uri: &str, out: &Path) -> Vec<u8> {
    let (ok, _, err) = sh("nbdcopy", &[uri, out.to_str().unwrap()]);
    assert!(ok, "nbdcopy {uri}: {err}");
    std::fs::read(out).unwrap()
}

#[test]
fn nbd_and_fuse_give_the_same_answers_over_the_daemons_images() {
    if !fuse_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let files = [
        ("etc/hostname", b"conformance\n".to_vec()),
        ("data.bin", pattern(3 << 20, 24)),
    ];
    let image: PathBuf = make_ext4(tmp.path(), 16, &files);
    publish(&store.url(), &image, "tpl");
    let start = std::fs::read(&image).unwrap();
    let size = start.len() as u64;
    let fuse = tmp.path().join("fuse");
    let daemon = DaemonProc::start(
        &store.url(),
        &tmp.path().join("cache"),
        &["--fuse", fuse.to_str().unwrap()],
    );
    create_overlay(&daemon, "tpl", "sb-nbd");
    create_overlay(&daemon, "tpl", "sb-fuse");
    wait_for_file(&fuse.join("sandboxes/sb-fuse"));
    wait_for_file(&fuse.join("sandboxes/sb-nbd"));
    wait_for_file(&fuse.join("templates/tpl"));
    let nbd = |name: &str, scratch: &str| NbdDoor {
        uri: daemon.nbd_uri(name),
        scratch: tmp.path().join(scratch),
    };

    let steps = script(size);
    let by_nbd = nbd("sb-nbd", "nbd").run(&steps);
    let by_fuse = FuseDoor {
        path: fuse.join("sandboxes/sb-fuse"),
    }
    .run(&steps);
    check_model(&start, &steps, &by_nbd, true);
    check_model(&start, &steps, &by_fuse, true);
    assert_same(&steps, ("NBD", &by_nbd), ("FUSE", &by_fuse));
    // Every operation was counted once as its neutral operation, under its door.
    for command in [
        "read",
        "write",
        "flush",
        "trim",
        "write_zeroes",
        "block_status",
        "fuse_read",
        "fuse_write",
        "fuse_flush",
        "fuse_write_zeroes",
        "fuse_extents",
    ] {
        let name = format!("lazyblk_nbd_requests_total{{command=\"{command}\",result=\"ok\"}}");
        assert!(daemon.metric(&name) > 0.0, "{name} not counted");
    }
    // Each sandbox read whole through the other door: the same bytes.
    let fuse_of_nbd = std::fs::read(fuse.join("sandboxes/sb-nbd")).unwrap();
    let nbd_of_fuse = nbd_bytes(&daemon.nbd_uri("sb-fuse"), &tmp.path().join("sb-fuse.img"));
    assert!(fuse_of_nbd == nbd_of_fuse, "the two sandboxes differ");

    let steps = read_only_script(size);
    let by_nbd = nbd("tpl", "nbd-template").run(&steps);
    let by_fuse = FuseDoor {
        path: fuse.join("templates/tpl"),
    }
    .run(&steps);
    check_model(&start, &steps, &by_nbd, false);
    assert_same(&steps, ("NBD", &by_nbd), ("FUSE", &by_fuse));
    drop(daemon);
}
