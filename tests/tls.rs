//! Issue 14: NBD over TLS with libnbd's `nbds://` URIs and certificates made at test
//! time with `openssl`: a client with a certificate the CA signed is served; one
//! without a valid certificate is refused; a plain client against `--tls require` is
//! refused with NBD_REP_ERR_TLS_REQD.

mod support;

use std::path::Path;

use support::node::{sh, DaemonProc};
use support::{make_ext4, pattern, publish, StoreProc};

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_certs(dir: &Path) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    // Extensions make a version 3 certificate, which webpki requires.
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=lazyblk test CA",
        ],
    );
    for (name, ext) in [
        ("server", Some("server.ext")),
        ("client", Some("client.ext")),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &*Box::leak(format!("{name}.csr").into_boxed_str()),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &*Box::leak(format!("{name}-cert.pem").into_boxed_str()),
            "-days",
            "2",
        ];
        if let Some(ext) = ext {
            args.extend(["-extfile", ext]);
        }
        openssl(dir, &args);
    }
}

#[test]
fn nbd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    // libnbd's certificate directory: ca-cert.pem, client-cert.pem, client-key.pem.
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    for d in [&good, &bad] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(certs.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    }
    std::fs::copy(certs.join("client-cert.pem"), good.join("client-cert.pem")).unwrap();
    std::fs::copy(certs.join("client-key.pem"), good.join("client-key.pem")).unwrap();

    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 71))]);
    publish(&store.url(), &image, "t");
    let p = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let (cert, key, ca) = (p("server-cert.pem"), p("server-key.pem"), p("ca-cert.pem"));
    let node = DaemonProc::start(
        &store.url(),
        &dir.path().join("cache"),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "--tls",
            "require",
        ],
    );
    let tls_uri = |d: &Path| {
        format!(
            "nbds://127.0.0.1:{}/t?tls-certificates={}",
            node.nbd_port,
            d.display()
        )
    };

    let (ok, out, err) = sh("nbdinfo", &["--size", &tls_uri(&good)]);
    assert!(ok, "a client with a signed certificate: {err}");
    assert_eq!(out.trim(), (8u64 << 20).to_string());
    let copy = dir.path().join("copy");
    let (ok, _, err) = sh("nbdcopy", &[&tls_uri(&good), copy.to_str().unwrap()]);
    assert!(ok, "nbdcopy over TLS: {err}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap());

    let (ok, _, err) = sh("nbdinfo", &["--size", &tls_uri(&bad)]);
    assert!(!ok, "a client without a certificate was served");
    eprintln!("no client certificate: {err}");

    let (ok, _, err) = sh("nbdinfo", &["--size", &node.nbd_uri("t")]);
    assert!(!ok, "a plain client was served by --tls require");
    assert!(
        err.to_lowercase().contains("tls"),
        "the refusal names TLS: {err}"
    );
}
