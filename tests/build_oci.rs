//! `lazyblk build --from-oci`: container images (an OCI image layout, a tar of one, a
//! `docker save` archive) made at test time into templates, checked with debugfs and
//! e2fsck on the image read back over NBD. Two layers: a whiteout, an opaque directory,
//! a setuid file, a hard link, a file capability, a device node, a fifo, a file of
//! another owner, and a later layer writing through a symlink. When the tests run as
//! root, the build itself runs as uid 65534 (setpriv), so nothing in it needs root.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::node::sh;
use support::oci::{self, chmod_tree, config, debugfs, gzip, open_dir, sha, write_layout, Layer};
use support::{lazyblk, StoreProc};

/// A file capability (vfs_cap_data revision 2): cap_net_raw permitted and effective.
fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2, effective
    v.extend_from_slice(&(1u32 << 13).to_le_bytes()); // permitted[0]: CAP_NET_RAW
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted[1]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[1]
    v
}

struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl LayerBuilder {
    fn new() -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Complete);
        LayerBuilder { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0, 0);
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn file(&mut self, path: &str, mode: u32, uid: u64, body: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, body.len() as u64);
        self.tar.append_data(&mut h, path, body).unwrap();
        self
    }

    fn file_with_xattr(&mut self, path: &str, name: &str, value: &[u8]) -> &mut Self {
        let key = format!("SCHILY.xattr.{name}");
        self.tar
            .append_pax_extensions([(key.as_str(), value)])
            .unwrap();
        self.file(path, 0o755, 0, b"ping-binary")
    }

    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777, 0, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    fn special(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        dev: (u32, u32),
    ) -> &mut Self {
        let mut h = Self::header(kind, mode, 0, 0);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// An entry whose name is written raw (the tar crate refuses `..` itself).
    fn raw_name(&mut self, name: &str, body: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, 0, body.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        self.tar.append(&h, body).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let tar = std::mem::replace(&mut self.tar, tar::Builder::new(Vec::new()));
        tar.into_inner().unwrap()
    }
}

fn lower_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc/")
        .file("etc/hostname", 0o644, 0, b"base\n")
        .dir("usr/")
        .dir("usr/bin/")
        .file("usr/bin/su", 0o4755, 0, b"su-binary")
        .file_with_xattr("usr/bin/ping", "security.capability", &capability())
        .link(tar::EntryType::Link, "usr/bin/ping-link", "usr/bin/ping")
        .dir("usr/lib/")
        .file("usr/lib/libbase.so", 0o644, 0, b"base library")
        .link(tar::EntryType::Symlink, "lib", "usr/lib")
        .link(tar::EntryType::Symlink, "escape", "/")
        .dir("old/")
        .file("old/gone", 0o644, 0, b"whited out")
        .file("old/kept", 0o644, 0, b"kept")
        .dir("opq/")
        .file("opq/lower", 0o644, 0, b"lower")
        .dir("opq2/")
        .dir("opq2/sub/")
        .file("opq2/sub/lowerfile", 0o644, 0, b"lower")
        .dir("dev/")
        .special(tar::EntryType::Char, "dev/null", 0o666, (1, 3))
        .link(tar::EntryType::Link, "dev/null-link", "dev/null")
        .dir("run/")
        .special(tar::EntryType::Fifo, "run/fifo", 0o600, (0, 0))
        .dir("home/")
        .dir("home/user/")
        .file("home/user/notes", 0o600, 1000, b"mine")
        .finish()
}

fn upper_layer() -> Vec<u8> {
    LayerBuilder::new()
        .file("old/.wh.gone", 0o644, 0, b"")
        .dir("opq/")
        .file("opq/.wh..wh..opq", 0o644, 0, b"")
        .file("opq/upper", 0o644, 0, b"upper")
        .file("etc/hostname", 0o644, 0, b"top\n")
        // Made before the opaque marker in the same layer: kept, but what the lower
        // layer had inside it goes.
        .dir("opq2/")
        .dir("opq2/sub/")
        .file("opq2/sub/new", 0o644, 0, b"new")
        .file("opq2/.wh..wh..opq", 0o644, 0, b"")
        // Through the symlink lib -> usr/lib: lands in usr/lib.
        .file("lib/libtop.so", 0o644, 0, b"top library")
        // Through escape -> /: stays inside the image, never on the host.
        .file("escape/escaped", 0o644, 0, b"inside")
        .finish()
}

fn labels_given() -> Value {
    json!({"org.opencontainers.image.version": "1.2.3", "team": "agents"})
}

fn config_of(layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    config(&diff_ids, Some(&labels_given()))
}

/// An OCI image layout in `dir`, the first layer stored plain, the second
/// gzip-compressed; returns the manifest's digest.
fn oci_layout(dir: &Path, layers: &[Vec<u8>]) -> String {
    let stored = [Layer::plain(layers[0].clone()), Layer::gzip(&layers[1])];
    write_layout(dir, &stored, Some(&labels_given()), Some("demo:1")).manifest_digest
}

/// A `docker save` archive of the same layers, at `path`; returns the config's digest.
fn docker_save(path: &Path, layers: &[Vec<u8>]) -> String {
    let config = config_of(layers);
    let id = sha(&config);
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, bytes).unwrap();
    };
    add(&format!("{}.json", &id[7..]), &config);
    add("l1/layer.tar", &layers[0]);
    add("l2/layer.tar", &layers[1]);
    let manifest = json!([{
        "Config": format!("{}.json", &id[7..]),
        "RepoTags": ["demo:docker"],
        "Layers": ["l1/layer.tar", "l2/layer.tar"],
    }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    std::fs::write(path, tar.into_inner().unwrap()).unwrap();
    id
}

/// Runs `lazyblk build` (as uid 65534 when the tests run as root).
fn build(
    store: &StoreProc,
    from_oci: &Path,
    template: &str,
    work: &Path,
) -> (bool, String, String) {
    std::fs::create_dir_all(work).unwrap();
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o777)).unwrap();
    let args = [
        "build",
        "--from-oci",
        from_oci.to_str().unwrap(),
        "--template",
        template,
        "--work-dir",
        work.to_str().unwrap(),
        "--store",
        &store.url(),
        "--json",
    ];
    let out = if nix::unistd::geteuid().is_root() {
        std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(support::bin())
            .args(args)
            .env("LAZYBLK_LOG", "warn")
            .output()
            .expect("running setpriv")
    } else {
        lazyblk().args(args).output().expect("running lazyblk")
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The template's image read back through a daemon.
fn read_back(store: &StoreProc, tmp: &Path, template: &str) -> PathBuf {
    oci::read_back(store, tmp, template, template)
}

fn labels(store: &StoreProc, template: &str) -> Value {
    let (ok, out, err) = support::run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == template)
        .unwrap_or_else(|| panic!("{template} not listed: {list}"))["labels"]
        .clone()
}

/// What both archive kinds must give: the merged tree with its metadata, a clean fsck.
fn check_image(image: &Path) {
    let (ok, out, err) = sh("e2fsck", &["-fn", image.to_str().unwrap()]);
    assert!(ok, "e2fsck: {out}{err}");
    assert_eq!(
        debugfs(image, "cat /etc/hostname").lines().last(),
        Some("top")
    );
    let ls_old = debugfs(image, "ls /old");
    assert!(
        ls_old.contains("kept") && !ls_old.contains("gone"),
        "whiteout: {ls_old}"
    );
    let ls_opq = debugfs(image, "ls /opq");
    assert!(
        ls_opq.contains("upper") && !ls_opq.contains("lower"),
        "opaque: {ls_opq}"
    );
    let su = debugfs(image, "stat /usr/bin/su");
    assert!(
        su.contains("Mode:  04755") && su.contains("User:     0"),
        "setuid: {su}"
    );
    let notes = debugfs(image, "stat /home/user/notes");
    assert!(
        notes.contains("User:  1000")
            && notes.contains("Group:  1000")
            && notes.contains("Mode:  0600"),
        "owner: {notes}"
    );
    let ping = debugfs(image, "stat /usr/bin/ping");
    assert!(ping.contains("Links: 2"), "hard link: {ping}");
    let inode = |p: &str| {
        debugfs(image, &format!("stat {p}"))
            .split_whitespace()
            .nth(1)
            .map(str::to_string)
    };
    assert_eq!(
        inode("/usr/bin/ping"),
        inode("/usr/bin/ping-link"),
        "one inode"
    );
    let cap = debugfs(image, "ea_get -x /usr/bin/ping security.capability");
    let hex_of_cap: String = capability().iter().map(|b| format!("{b:02x} ")).collect();
    assert!(
        cap.replace('\n', " ").contains(hex_of_cap.trim()),
        "capability {hex_of_cap}: {cap}"
    );
    let null = debugfs(image, "stat /dev/null");
    assert!(null.contains("Type: character special"), "device: {null}");
    assert!(
        null.contains("Device major/minor number: 01:03"),
        "device: {null}"
    );
    assert!(null.contains("Mode:  0666"), "device mode: {null}");
    let sub = debugfs(image, "ls /opq2/sub");
    assert!(
        sub.contains("new") && !sub.contains("lowerfile"),
        "opaque below: {sub}"
    );
    let null_link = debugfs(image, "stat /dev/null-link");
    assert!(
        null_link.contains("Type: character special")
            && null_link.contains("Device major/minor number: 01:03"),
        "a hard link to a device: {null_link}"
    );
    let root = debugfs(image, "stat /");
    assert!(root.contains("Mode:  0755"), "the root's mode: {root}");
    let fifo = debugfs(image, "stat /run/fifo");
    assert!(fifo.contains("Type: FIFO"), "fifo: {fifo}");
    assert!(debugfs(image, "stat /lib").contains("Type: symlink"));
    assert_eq!(
        debugfs(image, "cat /usr/lib/libtop.so").lines().last(),
        Some("top library"),
        "written through the symlink"
    );
    assert_eq!(
        debugfs(image, "cat /escaped").lines().last(),
        Some("inside"),
        "a symlink to / resolves to the image's root"
    );
}

#[test]
fn an_oci_layout_becomes_a_template_with_its_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let layout = open_dir(tmp.path(), "layout");
    let digest = oci_layout(&layout, &[lower_layer(), upper_layer()]);
    chmod_tree(&layout);
    let (ok, out, err) = build(&store, &layout, "from-oci", &tmp.path().join("work"));
    assert!(ok, "build --from-oci: {out}{err}");
    assert!(
        !Path::new("/escaped").exists(),
        "a layer wrote through a symlink onto the host"
    );
    let image = read_back(&store, tmp.path(), "from-oci");
    check_image(&image);
    // Sized from the content: 64 MiB steps, not the 1 GiB a guess would take.
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(
        size.is_multiple_of(64 << 20) && size <= 256 << 20,
        "size {size}"
    );
    let labels = labels(&store, "from-oci");
    assert_eq!(labels["oci.digest"], digest.as_str(), "{labels}");
    assert_eq!(labels["oci.image"], "demo:1", "{labels}");
    assert_eq!(labels["team"], "agents", "{labels}");
    assert_eq!(
        labels["org.opencontainers.image.version"], "1.2.3",
        "{labels}"
    );

    // The same layout as a tar gives the same tree.
    let tar_path = tmp.path().join("layout.tar");
    let (ok, _, err) = sh(
        "tar",
        &[
            "-C",
            layout.to_str().unwrap(),
            "-cf",
            tar_path.to_str().unwrap(),
            ".",
        ],
    );
    assert!(ok, "{err}");
    chmod_tree(&tar_path);
    let (ok, out, err) = build(&store, &tar_path, "from-oci-tar", &tmp.path().join("work"));
    assert!(ok, "build --from-oci TAR: {out}{err}");
    check_image(&read_back(&store, tmp.path(), "from-oci-tar"));

    // Built again, from the tar of it, as the same template: the same bytes, so the
    // same chunks (mkfs.ext4's UUID, hash seed and clock, and every inode's times, come
    // from the image), and nodes that hold the first build hold the second.
    let again = StoreProc::start();
    let (ok, out, err) = build(&again, &tar_path, "from-oci", &tmp.path().join("work"));
    assert!(ok, "build --from-oci again: {out}{err}");
    let chunks =
        |store: &StoreProc| support::manifest_json(&store.url(), "from-oci")["chunks"].clone();
    assert_eq!(
        chunks(&store),
        chunks(&again),
        "a rebuild changed the image"
    );
}

#[test]
fn a_docker_save_archive_becomes_a_template() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let dir = open_dir(tmp.path(), "in");
    let archive = dir.join("image.tar");
    let id = docker_save(&archive, &[lower_layer(), upper_layer()]);
    chmod_tree(&dir);
    let (ok, out, err) = build(&store, &archive, "from-docker", &tmp.path().join("work"));
    assert!(ok, "build --from-oci (docker save): {out}{err}");
    check_image(&read_back(&store, tmp.path(), "from-docker"));
    let labels = labels(&store, "from-docker");
    assert_eq!(labels["oci.digest"], id.as_str(), "{labels}");
    assert_eq!(labels["oci.image"], "demo:docker", "{labels}");
}

#[test]
fn bad_images_are_refused_and_publish_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let work = tmp.path().join("work");

    // A layer whose bytes do not match the config's diff id.
    let corrupt = open_dir(tmp.path(), "corrupt");
    let mut upper = upper_layer();
    oci_layout(&corrupt, &[lower_layer(), upper.clone()]);
    // Rewrite the stored upper layer (its blob) with one changed byte, and its
    // descriptor stays: the build must notice by the diff id.
    let at = upper.windows(11).position(|w| w == b"top library").unwrap();
    upper[at] ^= 0x20;
    let index: Value =
        serde_json::from_slice(&std::fs::read(corrupt.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(corrupt.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    let blob = manifest["layers"][1]["digest"].as_str().unwrap();
    std::fs::write(corrupt.join("blobs/sha256").join(&blob[7..]), gzip(&upper)).unwrap();
    chmod_tree(&corrupt);
    let (ok, _, err) = build(&store, &corrupt, "corrupt", &work);
    assert!(!ok, "a corrupt layer was accepted");
    assert!(err.contains("corrupt") && err.contains("diff id"), "{err}");

    // A layer entry that climbs out of the root.
    let climbing = open_dir(tmp.path(), "climbing");
    let evil = LayerBuilder::new().raw_name("../../evil", b"x").finish();
    oci_layout(&climbing, &[lower_layer(), evil]);
    chmod_tree(&climbing);
    let (ok, _, err) = build(&store, &climbing, "climbing", &work);
    assert!(!ok, "a layer entry with .. was accepted");
    assert!(err.contains("leaves the image's root"), "{err}");

    // A whiteout that names the directory itself.
    let dots = open_dir(tmp.path(), "dots");
    let evil = LayerBuilder::new().file(".wh..", 0o644, 0, b"").finish();
    oci_layout(&dots, &[lower_layer(), evil]);
    chmod_tree(&dots);
    let (ok, _, err) = build(&store, &dots, "dots", &work);
    assert!(!ok, "a whiteout of .. was accepted");
    assert!(err.contains("names no file"), "{err}");
    assert!(
        dots.join("index.json").exists(),
        "the whiteout removed files of the build"
    );

    // A blob that is a symlink to a file of the host.
    let linked = open_dir(tmp.path(), "linked");
    oci_layout(&linked, &[lower_layer(), upper_layer()]);
    let index: Value =
        serde_json::from_slice(&std::fs::read(linked.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(linked.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    let blob = linked
        .join("blobs/sha256")
        .join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
    let host_file = tmp.path().join("host-secret.tar");
    std::fs::write(&host_file, lower_layer()).unwrap();
    std::fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink(&host_file, &blob).unwrap();
    chmod_tree(&linked);
    chmod_tree(&host_file);
    let (ok, _, err) = build(&store, &linked, "linked", &work);
    assert!(!ok, "a blob linked to a host file was read");
    assert!(err.contains("outside the image"), "{err}");

    // Not an image at all.
    let empty = open_dir(tmp.path(), "empty");
    let (ok, _, err) = build(&store, &empty, "empty", &work);
    assert!(!ok);
    assert!(err.contains("neither an OCI image layout"), "{err}");

    let (ok, out, err) = support::run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "[]", "a refused build published something");
}
