//! An HTTP proxy in front of a store, for faults: it forwards every request (one per
//! connection) and does to chunk GETs what its mode says: hold them for a delay, stall
//! them, or answer 503. It can also slow every request down (a slow store), and hold
//! manifest publishes (`PUT /v1/templates/{id}/manifest`) at a gate until the test lets
//! them through or drops them, so a test can act while a commit waits on its store.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The mode value that stalls chunk GETs for good.
pub const STALL: u64 = u64::MAX;
/// The mode value that answers chunk GETs with 503.
pub const FAIL: u64 = u64::MAX - 1;

/// How often a publish held at the gate looks whether it may go.
const GATE_POLL: Duration = Duration::from_millis(20);

/// What the gate does with manifest publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publishes {
    /// Forwarded to the store.
    Pass,
    /// Held until the gate changes.
    Hold,
    /// Never forwarded: the connection is closed unanswered (a store that did not get
    /// the publish; a held one is dropped the same way).
    Drop,
}

/// The faults a proxy applies, changed by the test while it runs.
struct Faults {
    /// Milliseconds each chunk GET is held, or [`STALL`], or [`FAIL`].
    chunks: Arc<AtomicU64>,
    /// Milliseconds every request is held before it is forwarded.
    every: AtomicU64,
    /// A [`Publishes`] as a number.
    publishes: AtomicU8,
    /// Publishes that reached the gate while it held them.
    held: AtomicU64,
}

/// A proxy; its thread lives as long as the test process.
pub struct Proxy {
    pub url: String,
    /// Milliseconds each chunk GET is held, or [`STALL`], or [`FAIL`].
    pub mode: Arc<AtomicU64>,
    faults: Arc<Faults>,
}

impl Proxy {
    pub fn start(store: &str, mode: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let store = store.trim_start_matches("http://").to_string();
        let mode = Arc::new(AtomicU64::new(mode));
        let faults = Arc::new(Faults {
            chunks: mode.clone(),
            every: AtomicU64::new(0),
            publishes: AtomicU8::new(Publishes::Pass as u8),
            held: AtomicU64::new(0),
        });
        let shared = faults.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (store, faults) = (store.clone(), shared.clone());
                std::thread::spawn(move || {
                    let _ = forward(client, &store, &faults);
                });
            }
        });
        Proxy { url, mode, faults }
    }

    pub fn set(&self, mode: u64) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Holds every request for `delay` before forwarding it (a slow store).
    pub fn delay_every(&self, delay: Duration) {
        self.faults
            .every
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Sets what happens to manifest publishes from now on (held ones included).
    pub fn publishes(&self, what: Publishes) {
        self.faults.publishes.store(what as u8, Ordering::SeqCst);
    }

    /// How many publishes reached the gate while it held them.
    pub fn publishes_held(&self) -> u64 {
        self.faults.held.load(Ordering::SeqCst)
    }
}

impl Faults {
    fn publishes(&self) -> Publishes {
        match self.publishes.load(Ordering::SeqCst) {
            x if x == Publishes::Hold as u8 => Publishes::Hold,
            x if x == Publishes::Drop as u8 => Publishes::Drop,
            _ => Publishes::Pass,
        }
    }

    /// Waits at the gate; whether the publish may go on to the store.
    fn gate(&self) -> bool {
        if self.publishes() == Publishes::Hold {
            self.held.fetch_add(1, Ordering::SeqCst);
        }
        loop {
            match self.publishes() {
                Publishes::Hold => std::thread::sleep(GATE_POLL),
                Publishes::Pass => return true,
                Publishes::Drop => return false,
            }
        }
    }
}

fn forward(mut client: TcpStream, store: &str, faults: &Faults) -> std::io::Result<()> {
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
    std::thread::sleep(Duration::from_millis(faults.every.load(Ordering::SeqCst)));
    let request_line = text.lines().next().unwrap_or_default();
    if request_line.starts_with("PUT /v1/templates/")
        && request_line.contains("/manifest ")
        && !faults.gate()
    {
        return Ok(());
    }
    if text.starts_with("GET /v1/chunks/") {
        match faults.chunks.load(Ordering::SeqCst) {
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
