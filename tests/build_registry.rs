//! `lazyblk build --from-oci docker://...` against a real registry: Debian's
//! `docker-registry` (the CNCF distribution registry) on 127.0.0.1 with TLS (a CA made
//! here with openssl) and htpasswd auth, images pushed into it with skopeo from OCI
//! layouts made here. Skipped, saying why, when those tools are missing
//! (scripts/setup.sh installs them).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::node::sh;
use support::oci::{self, debugfs, write_layout, Layer};
use support::{lazyblk, StoreProc};

/// How long the registry may take to listen (generous: the machine is shared).
const START_WAIT: Duration = Duration::from_secs(60);
const USER: &str = "builder";
const PASS: &str = "s3cret-pass";

/// A layer tar holding `files` (path, mode, body), directories made as needed.
fn layer(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, mode, body) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_size(body.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        tar.append_data(&mut h, path, *body).unwrap();
    }
    tar.into_inner().unwrap()
}

fn base_layer() -> Vec<u8> {
    layer(&[
        ("etc/hostname", 0o644, b"base\n"),
        ("usr/bin/su", 0o4755, b"su-binary"),
        ("usr/lib/libbase.so", 0o644, &support::pattern(300_000, 7)),
    ])
}

fn app_layer(version: &str) -> Vec<u8> {
    layer(&[("app/version", 0o644, version.as_bytes())])
}

/// An OCI image layout in `dir` of gzip-compressed `layers`; returns the manifest's
/// digest and the stored layers' digests.
fn oci_layout(dir: &Path, layers: &[Vec<u8>]) -> (String, Vec<String>) {
    let stored: Vec<Layer> = layers.iter().map(|l| Layer::gzip(l)).collect();
    let written = write_layout(dir, &stored, Some(&json!({"team": "agents"})), None);
    (written.manifest_digest, written.layer_digests)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_ok(cmd: &str, args: &[&str]) {
    let (ok, out, err) = sh(cmd, args);
    assert!(ok, "{cmd} {args:?}: {out}{err}");
}

/// A CA (`NAME.pem`, `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(format!("{name}.key"));
    let pem = dir.join(format!("{name}.pem"));
    run_ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            pem.to_str().unwrap(),
        ],
    );
    pem
}

/// The registry's certificate for 127.0.0.1, signed by the CA `ca`.
fn make_server_cert(dir: &Path, ca: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let crt = dir.join("server.pem");
    let ext = dir.join("server.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    run_ok(
        "openssl",
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ],
    );
    let ca_key = ca.with_extension("key");
    run_ok(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ],
    );
    (crt, key)
}

/// A `docker-registry serve` process; killed on drop. Its access log is `log`.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path, cert: &Path, key: &Path) -> Registry {
        let port = support::free_port();
        let storage = dir.join("storage");
        let htpasswd = dir.join("htpasswd");
        let (ok, out, err) = sh("htpasswd", &["-Bbn", USER, PASS]);
        assert!(ok, "htpasswd: {err}");
        std::fs::write(&htpasswd, out).unwrap();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n\
                 auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                storage.display(),
                cert.display(),
                key.display(),
                htpasswd.display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting docker-registry");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < START_WAIT,
                "the registry did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Registry {
            child,
            port,
            storage,
            log,
        }
    }

    fn image(&self, name: &str) -> String {
        format!("docker://127.0.0.1:{}/{name}", self.port)
    }

    /// GETs of a blob the registry answered with 200 (its access log).
    fn blob_gets(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let (get, ok) = (format!("\"GET /v2/demo/blobs/{digest} HTTP/"), "\" 200 ");
        log.lines()
            .filter(|l| l.contains(&get) && l.contains(ok))
            .count()
    }

    /// The file the registry keeps the blob `digest` in.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(layout: &Path, dest: &str, certs: &Path) {
    run_ok(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-creds",
            &format!("{USER}:{PASS}"),
            "--dest-cert-dir",
            certs.to_str().unwrap(),
            &format!("oci:{}", layout.display()),
            dest,
        ],
    );
}

/// `lazyblk build --from-oci FROM` into `store` as `template`, with `extra` flags.
fn build(
    store: &StoreProc,
    from: &str,
    template: &str,
    work: &Path,
    extra: &[String],
) -> (bool, String) {
    let out = lazyblk()
        .args([
            "build",
            "--from-oci",
            from,
            "--template",
            template,
            "--store",
            &store.url(),
        ])
        .arg("--work-dir")
        .arg(work)
        .args(extra)
        .env("LAZYBLK_LOG", "warn")
        .env_remove("LAZYBLK_REGISTRY_AUTH")
        .output()
        .expect("running lazyblk build");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn listed(store: &StoreProc, template: &str) -> bool {
    let (ok, out, err) = support::run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .any(|t| t["template"] == template)
}

/// The template `demo` of `store` read back through a daemon into `DIR/NAME.img`.
fn read_back(store: &StoreProc, dir: &Path, name: &str) -> PathBuf {
    oci::read_back(store, dir, "demo", name)
}

fn manifest(store: &StoreProc, template: &str) -> Value {
    support::manifest_json(&store.url(), template)
}

#[test]
fn build_from_a_registry_with_tls_and_auth() {
    for tool in [
        "docker-registry",
        "skopeo",
        "htpasswd",
        "openssl",
        "mkfs.ext4",
    ] {
        if !have(tool) {
            eprintln!("SKIPPED: {tool} is not installed (scripts/setup.sh installs it)");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, certs) = (dir.join("pki"), dir.join("certs"));
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::create_dir_all(&certs).unwrap();
    let ca = make_ca(&pki, "ca");
    let wrong_ca = make_ca(&pki, "wrong-ca");
    let (cert, key) = make_server_cert(&pki, &ca);
    // skopeo reads CAs from *.crt in its cert dir (and takes a *.key for a client key).
    std::fs::copy(&ca, certs.join("ca.crt")).unwrap();
    let registry = Registry::start(dir, &cert, &key);

    let (v1_digest, v1_layers) = oci_layout(&dir.join("v1"), &[base_layer(), app_layer("1")]);
    let (_, v2_layers) = oci_layout(&dir.join("v2"), &[base_layer(), app_layer("2")]);
    assert_eq!(
        v1_layers[0], v2_layers[0],
        "the tags share their base layer"
    );
    push(
        &dir.join("v1"),
        &format!("{}:1", registry.image("demo")),
        &certs,
    );
    push(
        &dir.join("v2"),
        &format!("{}:2", registry.image("demo")),
        &certs,
    );

    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cache = dir.join("layers");
    let auth = format!("{USER}:{PASS}");
    // Flags at fixed places: 1 the credentials, 3 the CA, 5 the layer cache.
    let args: Vec<String> = [
        "--registry-auth",
        &auth,
        "--registry-ca",
        ca.to_str().unwrap(),
        "--layer-cache",
        cache.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();

    // The same image from the layout and from the registry: the same template.
    let store = StoreProc::start();
    let from_layout = StoreProc::start();
    let (ok, out) = build(
        &from_layout,
        dir.join("v1").to_str().unwrap(),
        "demo",
        &work,
        &[],
    );
    assert!(ok, "{out}");
    let (ok, out) = build(
        &store,
        &format!("{}:1", registry.image("demo")),
        "demo",
        &work,
        &args,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("layer 1 of 2") && out.contains("downloaded"),
        "progress per layer: {out}"
    );
    let (a, b) = (manifest(&from_layout, "demo"), manifest(&store, "demo"));
    assert_eq!(b["labels"]["oci.digest"], json!(v1_digest), "{b}");
    assert_eq!(
        b["labels"]["oci.image"],
        json!(format!("127.0.0.1:{}/demo:1", registry.port)),
        "{b}"
    );
    // Built from one image, the two are the same bytes: the same chunk digests (the
    // file system's UUID, hash seed and times come from the image), and the same files,
    // read back through a daemon.
    assert_eq!(a["size"], b["size"], "{a}\n{b}");
    assert_eq!(
        a["chunks"], b["chunks"],
        "the registry's build differs from the layout's"
    );
    let (image_a, image_b) = (
        read_back(&from_layout, dir, "a"),
        read_back(&store, dir, "b"),
    );
    for path in [
        "/etc/hostname",
        "/usr/bin/su",
        "/usr/lib/libbase.so",
        "/app/version",
    ] {
        let (x, y) = (
            debugfs(&image_a, &format!("cat {path}")),
            debugfs(&image_b, &format!("cat {path}")),
        );
        assert!(!x.is_empty() && x == y, "{path}: {x:?} {y:?}");
        let mode = |i: &Path| {
            let stat = debugfs(i, &format!("stat {path}"));
            stat.lines()
                .find(|l| l.contains("Mode:"))
                .map(str::to_string)
        };
        assert_eq!(mode(&image_a), mode(&image_b), "{path}");
    }
    assert!(debugfs(&image_b, "stat /usr/bin/su").contains("Mode:  04755"));
    for image in [&image_a, &image_b] {
        let (ok, out, err) = sh("e2fsck", &["-fn", image.to_str().unwrap()]);
        assert!(ok, "e2fsck: {out}{err}");
        std::fs::remove_file(image).unwrap();
    }
    for layer in &v1_layers {
        assert_eq!(registry.blob_gets(layer), 1, "{layer} downloaded once");
    }

    // By digest: the same image, all of it from the layer cache.
    let by_digest = format!("{}@{v1_digest}", registry.image("demo"));
    let (ok, out) = build(&store, &by_digest, "demo-by-digest", &work, &args);
    assert!(ok, "{out}");
    let m = manifest(&store, "demo-by-digest");
    assert_eq!(m["labels"]["oci.digest"], json!(v1_digest), "{m}");
    for layer in &v1_layers {
        assert_eq!(registry.blob_gets(layer), 1, "{layer} came from the cache");
    }

    // The second tag: only its new layer is downloaded.
    let (ok, out) = build(
        &store,
        &format!("{}:2", registry.image("demo")),
        "demo-2",
        &work,
        &args,
    );
    assert!(ok, "{out}");
    assert!(out.contains("cached"), "{out}");
    assert_eq!(
        registry.blob_gets(&v2_layers[0]),
        1,
        "the shared base layer came from the cache"
    );
    assert_eq!(
        registry.blob_gets(&v2_layers[1]),
        1,
        "the new layer was downloaded"
    );

    // Wrong credentials, a wrong CA: refused clearly, nothing published.
    let mut wrong = args.clone();
    wrong[1] = "builder:wrong".to_string();
    let (ok, out) = build(
        &store,
        &format!("{}:1", registry.image("demo")),
        "bad-auth",
        &work,
        &wrong,
    );
    assert!(!ok, "{out}");
    assert!(out.contains("Not authorized"), "{out}");
    assert!(!listed(&store, "bad-auth"));
    let mut wrong = args.clone();
    wrong[3] = wrong_ca.to_str().unwrap().to_string();
    let (ok, out) = build(
        &store,
        &format!("{}:1", registry.image("demo")),
        "bad-ca",
        &work,
        &wrong,
    );
    assert!(!ok, "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    assert!(!listed(&store, "bad-ca"));

    // A tampered blob in the registry's storage, pulled into an empty layer cache.
    let blob = registry.blob_file(&v2_layers[1]);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let fresh = dir.join("fresh-layers");
    let mut tampered = args.clone();
    tampered[5] = fresh.to_str().unwrap().to_string();
    let (ok, out) = build(
        &store,
        &format!("{}:2", registry.image("demo")),
        "tampered",
        &work,
        &tampered,
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains(&v2_layers[1]) && out.contains("Invalid digest"),
        "{out}"
    );
    assert!(!listed(&store, "tampered"));
    let left: Vec<_> = std::fs::read_dir(fresh.join("sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(&v2_layers[1][7..]))
        .collect();
    assert!(
        left.is_empty(),
        "no tampered layer kept in the cache: {left:?}"
    );
}
