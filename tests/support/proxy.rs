//! An HTTP proxy in front of a store, for faults: it forwards every request (one per
//! connection) and does to chunk GETs what its mode says: hold them for a delay, stall
//! them, or answer 503.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The mode value that stalls chunk GETs for good.
pub const STALL: u64 = u64::MAX;
/// The mode value that answers chunk GETs with 503.
pub const FAIL: u64 = u64::MAX - 1;

/// A proxy; its thread lives as long as the test process.
pub struct Proxy {
    pub url: String,
    /// Milliseconds each chunk GET is held, or [`STALL`], or [`FAIL`].
    pub mode: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(store: &str, mode: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let store = store.trim_start_matches("http://").to_string();
        let mode = Arc::new(AtomicU64::new(mode));
        let shared = mode.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (store, mode) = (store.clone(), shared.clone());
                std::thread::spawn(move || {
                    let _ = forward(client, &store, &mode);
                });
            }
        });
        Proxy { url, mode }
    }

    pub fn set(&self, mode: u64) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

fn forward(mut client: TcpStream, store: &str, mode: &AtomicU64) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let length: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    if text.starts_with("GET /v1/chunks/") {
        match mode.load(Ordering::SeqCst) {
            STALL => {
                std::thread::sleep(Duration::from_secs(120));
                return Ok(());
            }
            FAIL => {
                return client.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
            }
            ms => std::thread::sleep(Duration::from_millis(ms)),
        }
    }
    // One request per connection: ask the store to close after answering.
    let head = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    let mut upstream = TcpStream::connect(store)?;
    upstream.write_all(head.as_bytes())?;
    upstream.write_all(&body)?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    client.write_all(&answer)
}
