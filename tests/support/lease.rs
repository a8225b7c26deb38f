//! Signed lease requests made by the tests themselves, from the wire format
//! `src/identity.rs` documents (ed25519 over method, path, time and the body's sha256):
//! a second implementation, so that the format is what is tested.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A node key of the test's own.
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn id_of(key: &SigningKey) -> String {
    hex::encode(&Sha256::digest(key.verifying_key().as_bytes())[..16])
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An HTTP/1.1 request with `headers` and `body`: (status, body).
pub fn request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let host = url.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The headers that prove `key` on a request (the format of `src/identity.rs`).
pub fn signed(
    key: &SigningKey,
    method: &str,
    path: &str,
    body: &[u8],
    at: u64,
) -> Vec<(String, String)> {
    let message = format!(
        "lazyblk-request-v1\n{method}\n{path}\n{at}\n{}",
        hex::encode(Sha256::digest(body))
    );
    vec![
        (
            "x-lazyblk-node-key".into(),
            hex::encode(key.verifying_key().as_bytes()),
        ),
        ("x-lazyblk-timestamp".into(), at.to_string()),
        (
            "x-lazyblk-signature".into(),
            hex::encode(key.sign(message.as_bytes()).to_bytes()),
        ),
    ]
}

/// A heartbeat of node `id`, signed by `key`, carrying `extra` headers.
pub fn heartbeat(
    store: &str,
    key: &SigningKey,
    id: &str,
    beat: &Value,
    extra: &[(String, String)],
) -> (u16, String) {
    let path = format!("/v1/nodes/{id}");
    let body = serde_json::to_vec(beat).unwrap();
    let mut headers = signed(key, "PUT", &path, &body, now_ms());
    headers.extend_from_slice(extra);
    request(store, "PUT", &path, &headers, &body)
}
