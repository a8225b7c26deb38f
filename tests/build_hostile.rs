//! `lazyblk build --from-oci` against hostile container images (issue 23, findings 10 to
//! 13), each archive made at test time: attribute names that would be debugfs options,
//! header bombs (GNU long names, PAX records, a gzip bomb), 20,000 files in one
//! directory, a 1,500-deep tree, binary PAX values, and an `index.json` that is a
//! symlink to a file of the host. Every refusal names its limit and leaves no work
//! directory behind. When the tests run as root, the build runs as uid 65534.

mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use support::node::sh;
use support::oci::{self, chmod_tree, debugfs, open_dir, write_layout, Layer};
use support::StoreProc;

/// stderr of a refused build is read by people: a hostile name must not make it huge.
const MAX_ERROR_BYTES: usize = 64 << 10;

fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    build(&mut tar);
    tar.into_inner().unwrap()
}

fn add_file(tar: &mut tar::Builder<Vec<u8>>, path: &str, uid: u64, body: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, uid, body.len() as u64);
    tar.append_data(&mut h, path, body).unwrap();
}

fn add_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = header(tar::EntryType::Directory, 0o755, 0, 0);
    tar.append_data(&mut h, path, &[][..]).unwrap();
}

/// A layout of plain (uncompressed) layers, readable by every user.
fn image(tmp: &Path, name: &str, layers: &[Vec<u8>]) -> PathBuf {
    let dir = open_dir(tmp, name);
    let layers: Vec<Layer> = layers.iter().map(|l| Layer::plain(l.clone())).collect();
    write_layout(&dir, &layers, None, None);
    chmod_tree(&dir);
    dir
}

/// What a build left: its outcome, stdout, stderr.
struct Built {
    ok: bool,
    out: String,
    err: String,
}

/// Runs `lazyblk build --from-oci` (as uid 65534 when the tests run as root) with a
/// work directory of its own, and checks that the build left nothing in it.
fn build(store: &StoreProc, from: &Path, template: &str, work: &Path, extra: &[&str]) -> Built {
    build_with_path(store, from, template, work, extra, None)
}

fn build_with_path(
    store: &StoreProc,
    from: &Path,
    template: &str,
    work: &Path,
    extra: &[&str],
    path_prefix: Option<&Path>,
) -> Built {
    std::fs::create_dir_all(work).unwrap();
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o777)).unwrap();
    let url = store.url();
    let mut args = vec![
        "build",
        "--from-oci",
        from.to_str().unwrap(),
        "--template",
        template,
        "--work-dir",
        work.to_str().unwrap(),
        "--store",
        &url,
    ];
    args.extend_from_slice(extra);
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(support::bin());
        c
    } else {
        std::process::Command::new(support::bin())
    };
    cmd.args(&args).env("LAZYBLK_LOG", "warn");
    if let Some(prefix) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", prefix.display()));
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running lazyblk build");
    let left: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the build left {left:?} in its work directory"
    );
    Built {
        ok: out.status.success(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn refused(b: &Built, what: &str, needles: &[&str]) {
    assert!(!b.ok, "{what} was built: {}{}", b.out, b.err);
    assert!(
        b.err.len() < MAX_ERROR_BYTES,
        "{what}: an error of {} bytes",
        b.err.len()
    );
    for n in needles {
        assert!(b.err.contains(n), "{what}: {n:?} not in {}", b.err);
    }
}

fn no_templates(store: &StoreProc) {
    let (ok, out, err) = support::run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "[]", "a refused build published something");
}

/// The template's image read back through a daemon, checked clean by e2fsck.
fn read_back(store: &StoreProc, tmp: &Path, template: &str) -> PathBuf {
    let image = oci::read_back(store, tmp, template, template);
    let (ok, out, err) = sh("e2fsck", &["-fn", image.to_str().unwrap()]);
    assert!(ok, "e2fsck: {out}{err}");
    image
}

/// Finding 10: an attribute name that debugfs's getopt would take as `-f FILE` (a file
/// of the host, read with the builder's rights) is refused, and so is any name outside
/// Linux's namespaces; the build does not succeed with the attribute dropped.
#[test]
fn attribute_names_that_would_be_debugfs_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let work = tmp.path().join("work");
    let host = tmp.path().join("host-secret");
    std::fs::write(&host, b"HOST SECRET").unwrap();
    chmod_tree(&host);
    for (i, name) in [
        format!("-f{}", host.display()),
        "trusted".to_string(),
        "os2.x".to_string(),
    ]
    .iter()
    .enumerate()
    {
        let key = format!("SCHILY.xattr.{name}");
        let l = layer(|t| {
            t.append_pax_extensions([(key.as_str(), &b"value"[..])])
                .unwrap();
            add_file(t, "bin/tool", 0, b"tool");
        });
        let dir = image(tmp.path(), &format!("opt{i}"), &[l]);
        let b = build(&store, &dir, &format!("opt{i}"), &work, &[]);
        refused(
            &b,
            &format!("attribute {name:?}"),
            &["extended attribute", "namespace"],
        );
    }
    no_templates(&store);
}

/// Finding 13: attribute values are bytes; a PAX value holding line breaks (a binary
/// `security.ima`) is written as it is, beside a `user.` attribute.
#[test]
fn binary_attribute_values_with_line_breaks_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let ima: Vec<u8> = vec![0x03, 0x02, b'\n', 0x00, 0xff, b'\n', b'=', b' ', 0x7f, 0x0a];
    let l = layer(|t| {
        t.append_pax_extensions([
            ("SCHILY.xattr.security.ima", ima.as_slice()),
            ("SCHILY.xattr.user.note", &b"line one\nline two"[..]),
        ])
        .unwrap();
        add_file(t, "bin/signed", 0, b"signed binary");
    });
    let dir = image(tmp.path(), "ima", &[l]);
    let b = build(&store, &dir, "ima", &tmp.path().join("work"), &[]);
    assert!(
        b.ok,
        "a binary attribute value failed the build: {}{}",
        b.out, b.err
    );
    let img = read_back(&store, tmp.path(), "ima");
    let got = debugfs(&img, "ea_get -x /bin/signed security.ima");
    let want: String = ima.iter().map(|b| format!("{b:02x} ")).collect();
    assert!(
        got.replace('\n', " ").contains(want.trim()),
        "security.ima {want}: {got}"
    );
    let note = debugfs(&img, "ea_get /bin/signed user.note");
    // debugfs shows the line break escaped.
    assert!(
        note.contains(r#""line one\nline two""#),
        "user.note: {note}"
    );
}

/// Finding 11: GNU long names and PAX records are not held whole: one over the header
/// limit is refused with a short message naming the limit and its flag.
#[test]
fn header_bombs_are_refused_with_a_short_error() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let work = tmp.path().join("work");
    let long_name = "n".repeat(8 << 20);
    let long = layer(|t| add_file(t, &long_name, 0, b"x"));
    let dir = image(tmp.path(), "longname", &[long]);
    let b = build(&store, &dir, "longname", &work, &[]);
    refused(&b, "an 8 MiB GNU long name", &["--max-header"]);

    let value = vec![b'v'; 8 << 20];
    let pax = layer(|t| {
        t.append_pax_extensions([("comment", value.as_slice())])
            .unwrap();
        add_file(t, "f", 0, b"x");
    });
    let dir = image(tmp.path(), "pax", &[pax]);
    let b = build(&store, &dir, "pax", &work, &[]);
    refused(&b, "an 8 MiB PAX record", &["--max-header"]);

    // A path longer than Linux's PATH_MAX in a small header.
    let deep_name = format!("{}/f", vec!["d".repeat(200); 30].join("/"));
    let l = layer(|t| add_file(t, &deep_name, 0, b"x"));
    let dir = image(tmp.path(), "pathmax", &[l]);
    let b = build(&store, &dir, "pathmax", &work, &[]);
    refused(&b, "a 6 KB path", &["PATH_MAX"]);
    no_templates(&store);
}

/// Finding 11: a gzip bomb (300 MiB of zeros in a few hundred KB) is refused once the
/// content passes `--max-content`, or the `--size` given; so is a tree over
/// `--max-entries`. Nothing is left in the work directory.
#[test]
fn content_and_entry_limits_refuse_bombs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let work = tmp.path().join("work");
    let bomb_size: u64 = 300 << 20;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(Tee {
        gz,
        hash: Sha256::new(),
    });
    let mut h = header(tar::EntryType::Regular, 0o644, 0, bomb_size);
    let zeros = std::io::Read::take(std::io::repeat(0), bomb_size);
    tar.append_data(&mut h, "zeros", zeros).unwrap();
    let tee = tar.into_inner().unwrap();
    let diff_id = format!("sha256:{}", hex::encode(tee.hash.finalize()));
    let gz = tee.gz.finish().unwrap();
    let dir = open_dir(tmp.path(), "bomb");
    let bomb = Layer {
        stored: gz,
        media_type: oci::LAYER_TAR,
        diff_id,
    };
    write_layout(&dir, &[bomb], None, None);
    chmod_tree(&dir);

    let b = build(&store, &dir, "bomb", &work, &["--max-content", "64M"]);
    refused(&b, "a 300 MiB gzip bomb", &["--max-content", "64 MiB"]);
    let b = build(&store, &dir, "bomb", &work, &["--size", "64M"]);
    refused(&b, "300 MiB for a 64 MiB image", &["--size", "64 MiB"]);

    let many = layer(|t| {
        for i in 0..200 {
            add_file(t, &format!("f{i}"), 0, b"");
        }
    });
    let dir = image(tmp.path(), "many", &[many]);
    let b = build(&store, &dir, "many", &work, &["--max-entries", "100"]);
    refused(&b, "200 entries", &["--max-entries", "100"]);
    // mkfs.ext4 -d is quadratic in the entries of one directory (finding 12).
    let b = build(&store, &dir, "many", &work, &["--max-dir-entries", "150"]);
    refused(
        &b,
        "200 entries in one directory",
        &["--max-dir-entries", "150"],
    );
    no_templates(&store);
}

/// Finding 13: a directory depth that makes mkfs.ext4 (1.47.0) abort with heap
/// corruption is refused before mkfs runs, naming `--max-depth`; the failed build
/// removes its work directory.
#[test]
fn a_deep_tree_is_refused_and_leaves_no_work_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let work = tmp.path().join("work");
    let l = layer(|t| {
        let mut path = String::new();
        for _ in 0..1500 {
            path.push_str("d/");
            add_dir(t, &path);
        }
        add_file(t, &format!("{path}f"), 0, b"deep");
    });
    let dir = image(tmp.path(), "deep", &[l]);
    let b = build(&store, &dir, "deep", &work, &[]);
    refused(&b, "a tree 1,500 deep", &["--max-depth"]);
    no_templates(&store);
}

/// Finding 13: `index.json` (and every file the build reads from the archive) is read
/// only as a regular file inside it: a symlink to a file of the host is refused, in a
/// layout directory and in a tar of one.
#[test]
fn an_index_linked_to_a_host_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let work = tmp.path().join("work");
    let l = layer(|t| add_file(t, "etc/hostname", 0, b"linked\n"));
    let dir = image(tmp.path(), "linked", &[l]);
    // The real index moved out to the host; the layout keeps a symlink to it.
    let host = tmp.path().join("host-index.json");
    std::fs::rename(dir.join("index.json"), &host).unwrap();
    std::os::unix::fs::symlink(&host, dir.join("index.json")).unwrap();
    chmod_tree(&host);
    let b = build(&store, &dir, "linked", &work, &[]);
    refused(
        &b,
        "a layout whose index.json is a host file",
        &["index.json", "outside"],
    );

    let archive = tmp.path().join("linked.tar");
    let (ok, _, err) = sh(
        "tar",
        &[
            "-C",
            dir.to_str().unwrap(),
            "-cf",
            archive.to_str().unwrap(),
            ".",
        ],
    );
    assert!(ok, "{err}");
    chmod_tree(&archive);
    let b = build(&store, &archive, "linked-tar", &work, &[]);
    refused(
        &b,
        "a tar whose index.json is a host file",
        &["index.json", "outside"],
    );
    no_templates(&store);
}

/// Finding 12: 20,000 files in one directory. The build names every entry by its inode
/// number (no debugfs path lookup per entry: a debugfs on PATH records each script),
/// and every file has its owner in the image.
#[test]
fn twenty_thousand_files_in_one_directory_keep_their_owners() {
    const FILES: u64 = 20_000;
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let l = layer(|t| {
        add_dir(t, "big/");
        for i in 0..FILES {
            add_file(t, &format!("big/file-{i:05}"), 1000 + i % 7, b"");
        }
    });
    let dir = image(tmp.path(), "big", &[l]);
    // A debugfs that keeps a copy of every script it runs, then runs the real one.
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v debugfs"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let shim = open_dir(tmp.path(), "shim");
    let scripts = open_dir(tmp.path(), "scripts");
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o777)).unwrap();
    let wrapper = shim.join("debugfs");
    let mut w = std::fs::File::create(&wrapper).unwrap();
    writeln!(
        w,
        "#!/bin/sh\nprev=\nfor a in \"$@\"; do\n  if [ \"$prev\" = -f ]; then cp \"$a\" \"{}/script-$$-$(date +%s%N)\"; fi\n  prev=$a\ndone\nexec {} \"$@\"",
        scripts.display(),
        real.trim()
    )
    .unwrap();
    drop(w);
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let b = build_with_path(
        &store,
        &dir,
        "big",
        &tmp.path().join("work"),
        &[],
        Some(&shim),
    );
    assert!(b.ok, "{}{}", b.out, b.err);

    // No command of any script names an entry by its path under /big.
    let mut lines = 0;
    for s in std::fs::read_dir(&scripts).unwrap() {
        let text = std::fs::read(s.unwrap().path()).unwrap();
        for line in text.split(|&b| b == b'\n') {
            lines += 1;
            let line = String::from_utf8_lossy(line);
            assert!(
                !line.contains("/big/file-"),
                "a path lookup per entry: {line}"
            );
        }
    }
    assert!(lines > 0, "no debugfs script was run");

    let img = read_back(&store, tmp.path(), "big");
    let listing = debugfs(&img, "ls -p /big");
    let mut seen = 0;
    for line in listing.lines().filter(|l| l.contains("/file-")) {
        // /ino/mode/uid/gid/name/size/
        let f: Vec<&str> = line.split('/').collect();
        let i: u64 = f[5].trim_start_matches("file-").parse().unwrap();
        assert_eq!(f[3], (1000 + i % 7).to_string(), "owner of {line}");
        assert_eq!(f[4], (1000 + i % 7).to_string(), "group of {line}");
        seen += 1;
    }
    assert_eq!(seen, FILES, "files in /big");
}

/// Writes the tar to the gzip encoder and to a hash of the plain tar (its diff id).
struct Tee {
    gz: flate2::write::GzEncoder<Vec<u8>>,
    hash: Sha256,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gz.write_all(buf)?;
        self.hash.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
