//! Issue 23, finding 13: a peer's request for a chunk with a wrong `len`
//! (`GET /v1/peer/chunks/{digest}?len=N`) is the asker's error. The owner answers 4xx,
//! and its store is not blamed: no fetch failure or corrupt chunk is counted against
//! it, so it is never passed over (before: 502, and two such requests put the store in
//! backoff for every read of the node).

mod support;

use sha2::{Digest as _, Sha256};
use support::node::{sh, DaemonProc};
use support::{make_ext4, manifest_json, metric_sum, pattern, publish_json, StoreProc};

/// `curl` a URL into `out`: the HTTP status.
fn curl_status(url: &str, out: &std::path::Path) -> u16 {
    let (ok, status, err) = sh(
        "curl",
        &[
            "-sS",
            "-o",
            out.to_str().unwrap(),
            "-w",
            "%{http_code}",
            url,
        ],
    );
    assert!(ok, "curl {url}: {err}");
    status.trim().parse().unwrap_or(0)
}

#[test]
fn a_wrong_len_is_the_askers_error_not_the_stores() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(3 << 20, 17))]);
    // Both ways a chunk is stored: zstd-compressed (the default) and raw.
    publish_json(&image, "packed", &store.url(), &[]);
    publish_json(&image, "raw", &store.url(), &["--no-compress"]);
    let packed = manifest_json(&store.url(), "packed");
    let raw = manifest_json(&store.url(), "raw");
    let node = DaemonProc::start_member(&store.url(), &dir.path().join("n"), &[]);
    let body = dir.path().join("body");

    // A digest of each manifest, with its real length (1 MiB chunks, none is last).
    let first = |m: &serde_json::Value| -> (usize, String) {
        m["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .find_map(|(i, c)| c.as_str().map(|d| (i, d.to_string())))
            .unwrap()
    };
    let len = 1u64 << 20;
    // A peer names the template and the chunk's index (the owner fetches only what a
    // manifest it knows names there).
    for (what, (index, digest)) in [("packed", first(&packed)), ("raw", first(&raw))] {
        for wrong in [4096, len - 1, len + 4096, 16 << 20] {
            for _ in 0..3 {
                let status = curl_status(
                    &format!(
                        "{}/v1/peer/chunks/{digest}?len={wrong}&template={what}&index={index}",
                        node.url()
                    ),
                    &body,
                );
                assert!(
                    (400..500).contains(&status),
                    "{what} chunk asked with len={wrong}: HTTP {status}, not the asker's error"
                );
            }
        }
        // Nothing was blamed on the store.
        assert_eq!(
            metric_sum(&node.url(), "lazyblk_fetch_failures_total"),
            0.0,
            "a wrong len counted as a store failure"
        );
        assert_eq!(
            metric_sum(&node.url(), "lazyblk_verify_failures_total"),
            0.0,
            "a wrong len counted as a corrupt chunk"
        );
        // The right length is served, byte for byte.
        let status = curl_status(
            &format!(
                "{}/v1/peer/chunks/{digest}?len={len}&template={what}&index={index}",
                node.url()
            ),
            &body,
        );
        assert_eq!(
            status,
            200,
            "{what}: {}",
            std::fs::read_to_string(&body).unwrap_or_default()
        );
        let bytes = std::fs::read(&body).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), digest, "{what}");
    }
    // The node still reads the template from its store at once (no backoff in the way).
    let copy = dir.path().join("copy");
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri("raw"), copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&image).unwrap()
    );
    assert_eq!(metric_sum(&node.url(), "lazyblk_fetch_failures_total"), 0.0);
}
