//! `lazyblk build --from-oci docker://...` against a small fake registry (plain HTTP,
//! `--registry-insecure-http`) that misbehaves on purpose: a 401 then a token endpoint,
//! a blob redirected to another host (followed without the credentials), a blob whose
//! bytes do not match its digest, an index with no manifest for this platform, a
//! registry that stalls mid-layer, a manifest that never ends, and a layer that unpacks to hundreds of MiB (streamed,
//! never held in memory). Each refusal is clear and publishes nothing.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use support::oci::{gzip, sha};
use support::{lazyblk, StoreProc};

const USER: &str = "builder";
const PASS: &str = "pw";
/// base64 of `builder:pw`.
const BASIC: &str = "Basic YnVpbGRlcjpwdw==";
const TOKEN: &str = "tok-123";
/// The uncompressed size of the big layer's one file (zeros: its gzip is ~250 KiB).
const BIG_FILE: usize = 256 << 20;
/// The most memory the build may take while it unpacks the big layer: well under the
/// layer, so the layer was never held whole.
const MAX_RSS_KIB: i64 = 160 << 10;

fn layer(path: &str, body: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(body.len() as u64);
    tar.append_data(&mut h, path, body).unwrap();
    tar.into_inner().unwrap()
}

/// How the fake registry misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// `/v2/` answers 401 with a bearer challenge; `/token` trades basic credentials for
    /// a token the other endpoints then require.
    TokenAuth,
    /// Basic auth; blobs redirect to the other host.
    RedirectBlobs,
    /// The layer's bytes are not the ones its digest names.
    WrongDigest,
    /// The tag names an index with manifests for other platforms only.
    NoPlatform,
    /// The layer's headers and half its bytes, then nothing.
    Stall,
    /// The tag's manifest never ends (spaces, without a length).
    HugeManifest,
    /// No auth, nothing wrong (the big layer).
    None,
}

/// An image's blobs and manifest, served by [`serve`].
struct Image {
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
    layer_digest: String,
}

/// The image of one layer, `stored` as the registry holds it (gzip), `diff_id` the
/// digest of its tar.
fn image(stored: Vec<u8>, diff_id: String) -> Image {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&stored), "size": stored.len()}],
    }))
    .unwrap();
    Image {
        layer_digest: sha(&stored),
        blobs: vec![(sha(&config), config), (sha(&stored), stored)],
        manifest,
    }
}

/// What the servers saw: each request's path and its Authorization header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Request {
    path: String,
    auth: Option<String>,
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut auth = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    Some(Request { path, auth })
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

/// Serves `image` as `demo:1` on `listener` (the registry) with `fault`; blobs
/// redirected there are served by a second listener on 127.0.0.2, `other`.
fn serve(listener: TcpListener, image: Arc<Image>, fault: Fault, other: String, seen: Seen) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (image, other, seen) = (image.clone(), other.clone(), seen.clone());
            std::thread::spawn(move || {
                let Some(req) = read_request(&mut stream) else {
                    return;
                };
                seen.lock()
                    .unwrap()
                    .push((req.path.clone(), req.auth.clone()));
                answer(&mut stream, &req, &image, fault, &other);
            });
        }
    });
}

fn answer(stream: &mut TcpStream, req: &Request, image: &Image, fault: Fault, other: &str) {
    let local = stream.local_addr().unwrap();
    let authorized = match fault {
        Fault::TokenAuth => req.auth.as_deref() == Some(&format!("Bearer {TOKEN}")),
        // The other host is storage that takes signed URLs, not the credentials.
        Fault::RedirectBlobs => {
            local.ip().to_string() == "127.0.0.2" || req.auth.as_deref() == Some(BASIC)
        }
        _ => true,
    };
    if req.path.starts_with("/token") {
        if req.auth.as_deref() == Some(BASIC) {
            let body = serde_json::to_vec(&json!({"token": TOKEN})).unwrap();
            return respond(
                stream,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                &body,
            );
        }
        return respond(stream, "401 Unauthorized", &[], b"{}");
    }
    if !authorized {
        let challenge = match fault {
            Fault::TokenAuth => format!("Bearer realm=\"http://{local}/token\",service=\"fake\""),
            _ => "Basic realm=\"fake\"".to_string(),
        };
        return respond(
            stream,
            "401 Unauthorized",
            &[("WWW-Authenticate", challenge)],
            b"{}",
        );
    }
    if req.path == "/v2/" {
        return respond(stream, "200 OK", &[], b"{}");
    }
    if let Some(reference) = req.path.strip_prefix("/v2/demo/manifests/") {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&image.manifest), "size": image.manifest.len(), "platform": {"os": "windows", "architecture": "amd64"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&image.manifest), "size": image.manifest.len(), "platform": {"os": "linux", "architecture": "s390x"}},
            ],
        }))
        .unwrap();
        let (body, kind) = if fault == Fault::NoPlatform && reference == "1" {
            (index, "application/vnd.oci.image.index.v1+json")
        } else if fault == Fault::HugeManifest {
            // No length: spaces until the client hangs up (at most 1 GiB).
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            let spaces = vec![b' '; 64 << 10];
            for _ in 0..(1 << 30) / spaces.len() {
                if stream.write_all(&spaces).is_err() {
                    break;
                }
            }
            return;
        } else {
            (
                image.manifest.clone(),
                "application/vnd.oci.image.manifest.v1+json",
            )
        };
        let headers = [
            ("Content-Type", kind.to_string()),
            ("Docker-Content-Digest", sha(&body)),
        ];
        return respond(stream, "200 OK", &headers, &body);
    }
    let Some(digest) = req
        .path
        .rsplit('/')
        .next()
        .filter(|_| req.path.contains("/blobs/"))
    else {
        return respond(stream, "404 Not Found", &[], b"{}");
    };
    let Some((_, blob)) = image.blobs.iter().find(|(d, _)| d == digest) else {
        return respond(stream, "404 Not Found", &[], b"{}");
    };
    let is_layer = digest == image.layer_digest;
    match fault {
        Fault::RedirectBlobs if local.ip().to_string() == "127.0.0.1" => {
            let location = format!("http://{other}/v2/demo/blobs/{digest}");
            respond(
                stream,
                "307 Temporary Redirect",
                &[("Location", location)],
                b"",
            )
        }
        Fault::WrongDigest if is_layer => {
            let mut bad = blob.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0xff;
            respond(stream, "200 OK", &[], &bad)
        }
        Fault::Stall if is_layer => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                blob.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&blob[..blob.len() / 2]);
            let _ = stream.flush();
            // Holds the connection open, sending nothing, until the client gives up.
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => respond(stream, "200 OK", &[], blob),
    }
}

/// A fake registry for `layer_tar` with `fault`; returns its `docker://` image, what
/// both hosts saw, and the layer's digest.
fn fake_registry(layer_tar: &[u8], fault: Fault) -> (String, Seen, String) {
    fake_registry_of(gzip(layer_tar), sha(layer_tar), fault)
}

fn fake_registry_of(stored: Vec<u8>, diff_id: String, fault: Fault) -> (String, Seen, String) {
    let image = Arc::new(image(stored, diff_id));
    let seen: Seen = Arc::default();
    let main = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.2:0").unwrap();
    let (main_addr, other_addr) = (main.local_addr().unwrap(), other.local_addr().unwrap());
    serve(
        main,
        image.clone(),
        fault,
        other_addr.to_string(),
        seen.clone(),
    );
    serve(
        other,
        image.clone(),
        fault,
        other_addr.to_string(),
        seen.clone(),
    );
    let digest = image.layer_digest.clone();
    (format!("docker://{main_addr}/demo:1"), seen, digest)
}

/// `lazyblk build` from `from` into `store` as `template`: (success, stdout+stderr).
fn build(
    store: &StoreProc,
    from: &str,
    template: &str,
    dir: &Path,
    extra: &[&str],
) -> (bool, String) {
    let cache = dir.join(format!("layers-{template}"));
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
        .args([
            "--registry-insecure-http",
            "--layer-cache",
            cache.to_str().unwrap(),
        ])
        .arg("--work-dir")
        .arg(dir)
        .args(extra)
        .env_remove("LAZYBLK_REGISTRY_AUTH")
        .env("HOME", dir)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DOCKER_CONFIG")
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

/// A gzip layer of one file of [`BIG_FILE`] zeros, and its tar's digest, made without
/// holding the tar.
fn big_layer() -> (Vec<u8>, String) {
    struct Tee(flate2::write::GzEncoder<Vec<u8>>, Sha256);
    impl Write for Tee {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.1.update(buf);
            self.0.write_all(buf)?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut tee = Tee(
        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
        Sha256::new(),
    );
    let mut h = tar::Header::new_ustar();
    h.set_path("big").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(BIG_FILE as u64);
    h.set_cksum();
    tee.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..BIG_FILE / zeros.len() {
        tee.write_all(&zeros).unwrap();
    }
    // The end of the archive: two zero blocks.
    tee.write_all(&zeros[..1024]).unwrap();
    let diff_id = format!("sha256:{}", hex::encode(tee.1.finalize()));
    (tee.0.finish().unwrap(), diff_id)
}

fn small_layer() -> Vec<u8> {
    layer("etc/hostname", b"from-a-fake-registry\n")
}

#[test]
fn a_401_then_a_token_endpoint() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (from, seen, _) = fake_registry(&small_layer(), Fault::TokenAuth);
    let auth = format!("{USER}:{PASS}");
    let (ok, out) = build(
        &store,
        &from,
        "token",
        tmp.path(),
        &["--registry-auth", &auth],
    );
    assert!(ok, "{out}");
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|(p, a)| p.starts_with("/token") && a.as_deref() == Some(BASIC)),
        "{seen:?}"
    );
    assert!(listed(&store, "token"));
}

#[test]
fn a_docker_config_file_gives_the_credentials() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (from, _, _) = fake_registry(&small_layer(), Fault::TokenAuth);
    let host = from
        .trim_start_matches("docker://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let config = json!({"auths": {host: {"auth": BASIC.trim_start_matches("Basic ")}}});
    std::fs::create_dir_all(tmp.path().join(".docker")).unwrap();
    std::fs::write(tmp.path().join(".docker/config.json"), config.to_string()).unwrap();
    let (ok, out) = build(&store, &from, "from-config", tmp.path(), &[]);
    assert!(ok, "{out}");
    assert!(listed(&store, "from-config"));
}

#[test]
fn a_redirect_to_another_host_gets_no_credentials() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (from, seen, layer_digest) = fake_registry(&small_layer(), Fault::RedirectBlobs);
    let auth = format!("{USER}:{PASS}");
    let (ok, out) = build(
        &store,
        &from,
        "redirect",
        tmp.path(),
        &["--registry-auth", &auth],
    );
    assert!(ok, "{out}");
    let seen = seen.lock().unwrap();
    let blob_requests: Vec<_> = seen
        .iter()
        .filter(|(p, _)| p.ends_with(&layer_digest))
        .collect();
    // One to the registry (with the credentials), one to the other host (without).
    assert_eq!(blob_requests.len(), 2, "{seen:?}");
    assert_eq!(blob_requests[0].1.as_deref(), Some(BASIC), "{seen:?}");
    assert_eq!(
        blob_requests[1].1, None,
        "credentials went to the other host: {seen:?}"
    );
}

#[test]
fn a_blob_whose_digest_is_wrong_is_refused() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (from, _, layer_digest) = fake_registry(&small_layer(), Fault::WrongDigest);
    let (ok, out) = build(&store, &from, "wrong-digest", tmp.path(), &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&layer_digest) && out.contains("Invalid digest"),
        "{out}"
    );
    assert!(!listed(&store, "wrong-digest"));
    let cached = std::fs::read_dir(tmp.path().join("layers-wrong-digest/sha256"))
        .unwrap()
        .count();
    assert_eq!(cached, 0, "nothing kept in the layer cache");
}

#[test]
fn an_index_without_this_platform_is_refused() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (from, _, _) = fake_registry(&small_layer(), Fault::NoPlatform);
    let (ok, out) = build(&store, &from, "no-platform", tmp.path(), &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("lists 2 manifests and none for linux/"),
        "{out}"
    );
    assert!(!listed(&store, "no-platform"));
}

#[test]
fn a_registry_that_stalls_mid_layer_times_out() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    // Big enough that half of it is more than one read.
    let body = support::pattern(1 << 20, 3);
    let (from, _, layer_digest) = fake_registry(&layer("data", &body), Fault::Stall);
    let (ok, out) = build(
        &store,
        &from,
        "stall",
        tmp.path(),
        &["--registry-timeout", "2s"],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains(&layer_digest) && out.contains("sent nothing for 2s (--registry-timeout)"),
        "{out}"
    );
    assert!(!listed(&store, "stall"));
}

#[test]
fn a_big_layer_is_streamed() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (stored, diff_id) = big_layer();
    let (from, _, _) = fake_registry_of(stored, diff_id, Fault::None);
    let (ok, out) = build(&store, &from, "big", tmp.path(), &[]);
    assert!(ok, "{out}");
    assert!(listed(&store, "big"));
    // The largest resident set of the children waited for so far (the builds, and
    // what they ran). A child starts from this process's memory, which therefore
    // never held the big layer either.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    assert!(
        usage.ru_maxrss < MAX_RSS_KIB,
        "the build took {} KiB",
        usage.ru_maxrss
    );
}

#[test]
fn a_pulled_layer_obeys_the_archive_limits() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (from, _, _) = fake_registry(&layer("data", &support::pattern(64 << 10, 5)), Fault::None);
    let (ok, out) = build(
        &store,
        &from,
        "limited",
        tmp.path(),
        &["--max-content", "4K"],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("--max-content"), "{out}");
    assert!(!listed(&store, "limited"));
}

#[test]
fn a_huge_manifest_is_refused() {
    let (store, tmp) = (StoreProc::start(), tempfile::tempdir().unwrap());
    let (from, _, _) = fake_registry(&small_layer(), Fault::HugeManifest);
    let (ok, out) = build(&store, &from, "huge-manifest", tmp.path(), &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("the manifest is over the limit of 16"),
        "{out}"
    );
    assert!(!listed(&store, "huge-manifest"));
}
